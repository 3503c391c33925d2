"""The embedded-data Prior trained in fp16 with per-resblock scaling, against the same run in fp32 (issue 6).

Tokenizes the first shards of the embedded dataset with a trained DVAE (`python -m lit_dalle tokenize`),
then trains a small Prior from `configs/prior.yaml` twice on those tokens with the same seed and data
order: in fp32, and in fp16 with `PerResblockScaling`. Reports both loss curves' ends (20-step running
means), the largest gap between their running means, and the skipped-step rate.

    python bench/precision_embedded.py --dvae runs/dvae/checkpoints/last.ckpt [--steps 300] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from lit_dalle.cli import main as cli
from lit_dalle.data import EmbeddedShapes, ensure_embedded


class Losses(L.Callback):
    """Records every training loss."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def fit(tokens: str, dvae: str, steps: int, plugin: bool, root: Path, width: int) -> tuple[list[float], object]:
    """Train the small Prior on the token shards; returns the losses and the precision plugin."""
    args = [
        "fit", "--config", "configs/prior.yaml", f"--model.dvae={dvae}", "--model.depth=4", f"--model.width={width}",
        "--model.heads=4", f"--data.train_shards={tokens}", "--data.num_workers=0", "--data.batch_size=32",
        f"--trainer.max_steps={steps}", "--trainer.max_time=null", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
    ]  # fmt: skip
    if plugin:
        args += ["--trainer.precision=null", "--trainer.plugins+=lit_dalle.plugins.PerResblockScaling",
                 "--trainer.plugins.init_args.device=cpu"]  # fmt: skip
    # The CLI instantiates callbacks from import paths: this module is registered under a stable name.
    run = cli([*args, "--trainer.callbacks+=bench_precision_embedded_losses.Losses"])
    recorder = next(c for c in run.trainer.callbacks if type(c).__name__ == "Losses")
    return recorder.values, run.trainer.precision_plugin


def running(values: list[float], n: int = 20) -> list[float]:
    return [sum(values[max(0, i - n + 1) : i + 1]) / len(values[max(0, i - n + 1) : i + 1]) for i in range(len(values))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dvae", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--shards", type=int, default=2, help="embedded train shards to tokenize (1,000 each)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import sys

    sys.modules["bench_precision_embedded_losses"] = sys.modules[__name__]
    tmp = Path(tempfile.mkdtemp(prefix="bench-fp16-"))
    train = sorted(ensure_embedded(EmbeddedShapes(resolution=64))["train"].glob("*.tar"))[: args.shards]
    cli(["tokenize", "--dvae", args.dvae, "--out", str(tmp / "tokens"), "--resolution", "64", "--shards",
         str([str(p) for p in train]).replace("'", '"')])  # fmt: skip
    results = {}
    for name, plugin in [("fp32", False), ("fp16 + PerResblockScaling", True)]:
        torch.manual_seed(0)
        start = time.time()
        losses, precision = fit(str(tmp / "tokens"), args.dvae, args.steps, plugin, tmp / name.split()[0], args.width)
        results[name] = (losses, precision, time.time() - start)
    (a, _, ta), (b, plugin, tb) = results.values()
    gap = max(abs(x - y) for x, y in zip(running(a), running(b)))
    skipped = getattr(plugin, "skipped_steps", None)
    if skipped is None and hasattr(plugin, "state_dict"):
        skipped = plugin.state_dict().get("skipped")
    lines = [
        "| run | steps | final loss (mean of last 20) | seconds |", "|---|---|---|---|",
        f"| fp32 | {len(a)} | {running(a)[-1]:.4f} | {ta:.0f} |",
        f"| fp16 + PerResblockScaling | {len(b)} | {running(b)[-1]:.4f} | {tb:.0f} |",
    ]  # fmt: skip
    finite = all(map(lambda v: v == v and abs(v) != float("inf"), b))
    summary = (f"Largest gap between the 20-step running means: {gap:.4f}; fp16 losses all finite: {finite}; "
               f"skipped steps: {skipped} of {len(b)}.")  # fmt: skip
    print("\n".join(lines) + "\n\n" + summary)
    if args.out:
        with open(args.out, "a") as f:
            heading = f"fp16 with per-resblock scaling on the embedded data ({time.strftime('%Y-%m-%d')}, CPU)"
            command = f"python bench/precision_embedded.py --dvae {args.dvae} --steps {args.steps} --width {args.width}"
            setup = (
                f"a Prior of depth 4, width {args.width} from configs/prior.yaml, {args.threads} thread, on "
                f"{args.shards * 1000} embedded training samples tokenized by the DVAE, same seed and data order"
            )
            f.write(f"\n## {heading}\n\n`{command}`: {setup}.\n\n" + "\n".join(lines) + "\n\n" + summary + "\n")


if __name__ == "__main__":
    main()
