"""Prior training throughput as a fraction of the device's measured matmul rate (model FLOPs utilisation).

The peak is measured, not taken from a datasheet: the best of a few large square matmuls in the training
dtype (``--peak-size``, default 8192 on CUDA, 1024 on CPU). The model runs full training steps of
`lit_dalle.prior.Prior` (forward, the paper's loss, backward, AdamW) under autocast, on random tokens.

FLOPs per trained token follow the usual dense-transformer count (Kaplan et al. 2020; PaLM, App. B):
6 x (matmul parameters seen by the token) + 12 x depth x T x width for the attention scores and values, with T
the sequence length. The attention term counts the whole T x T matrix, as PaLM does for causal models; the
sparse masks skip part of it (FlexAttention) or none (dense SDPA), so the "useful" column also gives the count
with each layer's mask density (`lit_dalle.models.masks.mask_density`) in place of 1.

    python bench/mfu.py --device cuda                      # bf16, depth 8, width 1024, 64 text + 32x32 image
    python bench/mfu.py --device cuda --schedule full --backend sdpa
    python bench/mfu.py --device cpu --depth 2 --width 128 --grid 8 --batch 4   # a smoke run here
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from lit_dalle.models.masks import mask_density, resolve_schedule
from lit_dalle.prior import Prior

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul in dtype over reps runs (after a warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def flops_per_token(prior: Prior, useful: bool) -> float:
    """Training FLOPs per token of the stream (forward + backward = 3x forward)."""
    cfg = prior.config
    t = cfg.text_len + cfg.grid**2  # the stream: text, then image tokens (the last one is not input)
    layers = [m for name, m in prior.transformer.named_modules() if name.endswith(("attn", "mlp"))]
    matmul = sum(p.numel() for layer in layers for name, p in layer.named_parameters() if p.dim() == 2)
    # Each position uses one head: text positions the text head, image positions the image head.
    heads = (cfg.text_len * cfg.text_vocab + cfg.grid**2 * cfg.image_vocab) * cfg.width / t
    kinds = resolve_schedule(cfg.mask_schedule, cfg.depth)
    if useful:
        density = [mask_density(k, cfg.text_len, cfg.grid, cfg.conv_kernel) for k in kinds]
    else:
        density = [1.0] * cfg.depth
    attention = sum(12 * t * cfg.width * d for d in density)
    return 6 * (matmul + heads) + attention


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--grid", type=int, default=32)
    p.add_argument("--text-vocab", type=int, default=16384)
    p.add_argument("--image-vocab", type=int, default=8192)
    p.add_argument("--schedule", default="paper", help="mask schedule name (paper, full, row, ...)")
    p.add_argument("--backend", choices=["auto", "sdpa", "flex"], default="auto")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-size", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)
    prior = Prior(
        text_vocab=args.text_vocab, text_len=args.text_len, image_size=args.grid * 8, image_vocab=args.image_vocab,
        depth=args.depth, width=args.width, heads=args.heads, mask_schedule=args.schedule,
        conv_kernel=min(11, 2 * (args.grid // 2) - 1), attention_backend=args.backend,
    ).to(device)  # fmt: skip
    if args.compile:
        prior.transformer = torch.compile(prior.transformer)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=1e-4, betas=(0.9, 0.96), eps=1e-8, weight_decay=4.5e-2)
    text = torch.randint(1, args.text_vocab, (args.batch, args.text_len), device=device)
    image = torch.randint(0, args.image_vocab, (args.batch, args.grid**2), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with autocast:
            loss = prior.loss(text, image)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = args.batch * (args.text_len + args.grid**2)
    peak = matmul_peak(device, dtype, args.peak_size or (8192 if device.type == "cuda" else 1024))
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()}-core CPU",
        "torch": torch.__version__,
        "dtype": str(dtype).split(".")[-1],
        "schedule": args.schedule,
        "backend": prior.config.attention_backend,
        "compile": args.compile,
        "parameters": sum(p.numel() for p in prior.parameters()),
        "tokens_per_step": tokens,
        "step_ms": 1e3 * seconds,
        "tokens_per_s": tokens / seconds,
        "matmul_peak_tflops": peak / 1e12,
        "mfu": tokens * flops_per_token(prior, useful=False) / seconds / peak,
        "mfu_useful": tokens * flops_per_token(prior, useful=True) / seconds / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    print(json.dumps(result, indent=1))
    print(
        f"| {result['device']} | {args.depth} x {args.width}, {args.heads} heads | {args.schedule} / "
        f"{result['backend']}{' (compiled)' if args.compile else ''} | {result['dtype']} | "
        f"{result['tokens_per_s']:,.0f} | {result['matmul_peak_tflops']:.1f} | {result['mfu']:.3f} | "
        f"{result['mfu_useful']:.3f} |"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
