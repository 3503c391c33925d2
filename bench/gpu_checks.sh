#!/usr/bin/env bash
# Every check that needs a GPU, in one run that fits one lent device call (about 8 minutes on an H100/H200):
#   1. the CUDA tests (FlexAttention block-sparse equals dense SDPA, fp16 / bf16 paths);
#   2. attention kernels per mask kind, dense-masked SDPA vs block-sparse FlexAttention, at
#      256 text + 16x16 = 512 and 256 text + 32x32 = 1280 positions (bench/attention.py);
#   3. Prior training MFU against the card's measured bf16 matmul rate (bench/mfu.py): the paper masks on
#      FlexAttention, the same on dense SDPA, and full attention on SDPA;
#   4. DVAE training / encode / decode images/s against the dall-e modules, fp32, bf16 and fp16 autocast,
#      channels_last (bench/dvae_throughput.py).
# Each step has its own timeout, so one slow step cannot eat the others; results go to $OUT (or argument 1).
#
# The GPU machine has torch, lightning, transformers, timm and torchmetrics, but not webdataset, braceexpand,
# jsonargparse, docstring-parser or dall-e. Carry them as wheels. Once, here, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl webdataset==1.0.2 braceexpand==0.1.7 jsonargparse==4.53.0 \
#     docstring-parser==0.18.0 typeshed-client==2.15.0
#   python3 -m pip wheel --no-deps -w .whl dall-e==0.1       # sdist only on PyPI: build its wheel here
# then in the device call (carry: [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:. && bash bench/gpu_checks.sh $OUT
set -u
out=${1:-${OUT:-/tmp/gpu_checks}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-.}
log="$out/gpu_checks.log"
step() {  # step SECONDS NAME COMMAND...: run with a timeout, log, keep going on failure
    local seconds=$1 name=$2
    shift 2
    echo "=== $name ($(date +%T), at most ${seconds}s)" | tee -a "$log"
    local start=$SECONDS
    timeout "$seconds" "$@" 2>&1 | tee -a "$log"
    echo "=== $name: exit ${PIPESTATUS[0]} in $((SECONDS - start)) s" | tee -a "$log"
}

step 20 env python3 -c "import torch, lightning; print(torch.__version__, lightning.__version__, torch.cuda.get_device_name())"
step 150 cuda-tests python3 -m pytest -q -x -p no:cacheprovider tests/models -k "cuda or flex"
step 100 attention-512 python3 bench/attention.py --device cuda --grid 16 --out "$out/RESULTS.md"
step 120 attention-1280 python3 bench/attention.py --device cuda --grid 32 --out "$out/RESULTS.md"
for spec in "paper flex" "paper sdpa" "full sdpa"; do
    set -- $spec
    step 90 "mfu-$1-$2" python3 bench/mfu.py --device cuda --schedule "$1" --backend "$2" --json "$out/mfu-$1-$2.json"
done
for flags in "--autocast none" "--autocast bf16 --channels-last" "--autocast fp16 --channels-last"; do
    step 60 "dvae $flags" python3 bench/dvae_throughput.py --device cuda $flags --n-hid 128 --resolution 256 --batch-size 16
done
echo "done; $out holds RESULTS.md (attention tables), mfu-*.json and gpu_checks.log" | tee -a "$log"
