"""Per-resblock gradient scaling (issue 6): step-time overhead, and fp16 training against fp32.

1. Overhead: median step time of a small Prior (Trainer, same data) under plain fp16 autocast + GradScaler
   (Lightning's ``MixedPrecision("16-mixed")`` with the device forced, since Lightning turns ``16-mixed``
   into bf16 on the CPU), under `PerResblockScaling`, and in fp32; then the plugin's own work alone (its hooks,
   filter, unscale and scale update around fp32 compute, interleaved with plain steps), which CPU fp16's slow
   matmuls would otherwise hide.
2. Training: a tiny Prior on synthetic caption / image-token batches (16 captions "a <color> <shape>",
   each with its own token grid, 10% of tokens resampled), fp32 against fp16 with the plugin: final
   losses, the largest gap between their 20-step running means, the skipped-step rate, the final scales
   (and fp16 with GradScaler for comparison).

    python bench/precision.py                       # CPU, 1 thread: about 4-5 minutes
    python bench/precision.py --device cuda --overhead-steps 50 --train-steps 1000
    python bench/precision.py --out bench/RESULTS.md   # also append a section there
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, Dataset

from lit_dalle.dvae import DVAE
from lit_dalle.plugins import PerResblockScaling
from lit_dalle.prior import Prior
from lit_dalle.text import TextTokenizer

COLORS, SHAPES = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle", "star"]
CAPTIONS = [f"a {c} {s}" for c in COLORS for s in SHAPES]


class SyntheticTokens(Dataset):
    """``{"image_tokens": [grid, grid], "caption": str}``: one fixed grid per caption, ``noise`` of it resampled."""

    def __init__(self, grid: int, vocab: int, n: int, noise: float = 0.1, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        prototypes = torch.randint(0, vocab, (len(CAPTIONS), grid, grid), generator=g)
        self.labels = torch.randint(0, len(CAPTIONS), (n,), generator=g)
        tokens = prototypes[self.labels]
        resample = torch.rand(tokens.shape, generator=g) < noise
        self.tokens = torch.where(resample, torch.randint(0, vocab, tokens.shape, generator=g), tokens)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image_tokens": self.tokens[i], "caption": CAPTIONS[self.labels[i]]}


class Record(L.Callback):
    """Per training batch: wall time and loss."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))  # syncs
        self.times.append(time.perf_counter() - self._start)


def make_prior(tmp: Path, size: dict, seed: int) -> Prior:
    tmp = tmp / f"vocab{size['image_vocab']}"
    tmp.mkdir(exist_ok=True)
    if not (tmp / "tokenizer.json").exists():
        TextTokenizer.train(CAPTIONS * 50, size["text_vocab"], dropout=0.0).save(tmp / "tokenizer.json")
        dvae = DVAE(vocab_size=size["image_vocab"], n_hid=8, group_count=4, n_blk_per_group=1, n_init=8)
        torch.save(
            {
                "state_dict": dvae.state_dict(),
                "hyper_parameters": dict(dvae.hparams),
                "pytorch-lightning_version": L.__version__,
            },
            tmp / "dvae.ckpt",
        )  # fmt: skip  (loaded, never run)
    torch.manual_seed(seed)
    return Prior(dvae=str(tmp / "dvae.ckpt"), tokenizer=str(tmp / "tokenizer.json"), bpe_dropout=0.0, **size)


def fit(model: Prior, plugin, device: str, steps: int, data: Dataset, batch: int, tmp: Path) -> Record:
    record = Record()
    kwargs = {"plugins": [plugin]} if plugin is not None else {"precision": "32-true"}
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=steps, gradient_clip_val=4.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[record], default_root_dir=tmp, **kwargs,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    trainer.fit(model, DataLoader(data, batch_size=batch, shuffle=True, generator=g, drop_last=True))
    record.plugin = plugin
    return record


def bookkeeping_ms(size: dict, device: str, reps: int) -> tuple[float, float]:
    """Min step time (ms) of fp32 forward + backward + AdamW, without and with the plugin's hooks, unscale and
    scale update, interleaved (A B A B ...) so that load from other processes hits both alike."""
    prior = make_prior(Path(tempfile.mkdtemp()), size, 0).to(device)
    net, optimizer, plugin = prior.transformer, torch.optim.AdamW(prior.parameters()), PerResblockScaling(device)
    plugin.convert_module(net)
    data = SyntheticTokens(grid=net.config.grid, vocab=net.config.image_vocab, n=16)
    image = data.tokens.flatten(1).to(device)
    text = prior.encode_text([CAPTIONS[i] for i in data.labels])
    times: dict[bool, list[float]] = {False: [], True: []}
    for rep in range(2 * reps):
        hooked = bool(rep % 2)
        if hooked:
            plugin.convert_module(net)
        else:
            plugin.teardown()
        start = time.perf_counter()
        optimizer.zero_grad()
        _, logits = net(text, image)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), image.flatten()).backward()
        if hooked:
            nonfinite, skip = plugin.unscale_gradients(optimizer)
            plugin.scales.update(nonfinite, skip)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times[hooked].append(time.perf_counter() - start)
    return min(times[False]) * 1000, min(times[True]) * 1000


def running_mean(values: list[float], n: int = 20) -> list[float]:
    return [sum(values[max(0, i - n + 1) : i + 1]) / len(values[max(0, i - n + 1) : i + 1]) for i in range(len(values))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--overhead-steps", type=int, default=30)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--out", default=None, help="append the results to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    d = args.device
    size = dict(
        text_vocab=300,
        text_len=8,
        image_size=64,
        image_vocab=64,
        downsample=8,
        depth=4,
        width=64,
        heads=4,
        lr=1e-3,
        attention_backend="sdpa",
    )  # fmt: skip  (8x8 tokens, 72 positions, 8 resblocks)
    lines = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # 1. overhead
        data = SyntheticTokens(grid=8, vocab=64, n=16 * (args.overhead_steps + 1))
        rows = {}
        for name, plugin in [
            ("fp32", None),
            ("fp16 autocast + GradScaler", MixedPrecision("16-mixed", d, scaler=torch.amp.GradScaler(d))),
            ("fp16 + PerResblockScaling", PerResblockScaling(d)),
        ]:
            rec = fit(make_prior(tmp, size, 0), plugin, d, args.overhead_steps, data, 16, tmp)
            rows[name] = statistics.median(rec.times[3:]) * 1000, min(rec.times[3:]) * 1000
            print(f"{name}: {rows[name][0]:.1f} ms/step (min {rows[name][1]:.1f})", flush=True)
        base, fp32_ms = rows["fp16 autocast + GradScaler"][0], rows["fp32"][0]
        plain, hooked = bookkeeping_ms(size, d, reps=3 * args.overhead_steps)
        print(f"bookkeeping: {plain:.1f} -> {hooked:.1f} ms", flush=True)
        lines += [
            f"Step time, Prior depth 4 (8 resblocks), width 64, 8 text + 8x8 image tokens, batch 16, "
            f"{args.overhead_steps} steps, median (and min) after the first 3 (Trainer, clipping at 4):",
            "",
            "| precision | ms / step (min) | vs fp32 | vs fp16 + GradScaler |",
            "|---|---|---|---|",
            *[f"| {k} | {v:.1f} ({m:.1f}) | {v / fp32_ms:.2f}x | {v / base:.2f}x |" for k, (v, m) in rows.items()],
            "",
            f"The plugin's own work (hooks, Inf/NaN filter, unscale, scale update) on the same model in fp32, "
            f"{3 * args.overhead_steps} interleaved steps each, min: {plain:.1f} ms without, {hooked:.1f} ms with "
            f"(+{hooked - plain:.1f} ms, {100 * (hooked - plain) / plain:+.0f}%).",
            "",
        ]
        # 2. training
        data = SyntheticTokens(grid=8, vocab=64, n=16 * args.train_steps)
        runs = {}
        for name, plugin in [
            ("fp32", None),
            ("fp16 autocast + GradScaler", MixedPrecision("16-mixed", d, scaler=torch.amp.GradScaler(d))),
            ("fp16 + PerResblockScaling", PerResblockScaling(d)),
        ]:
            start = time.perf_counter()
            runs[name] = fit(make_prior(tmp, size, 0), plugin, d, args.train_steps, data, 16, tmp)
            print(f"{name}: final loss {runs[name].losses[-1]:.4f}, {time.perf_counter() - start:.0f} s", flush=True)
        fp32, amp, fp16 = (running_mean(r.losses) for r in runs.values())
        scaler = runs["fp16 autocast + GradScaler"].plugin.scaler
        plugin = runs["fp16 + PerResblockScaling"].plugin
        scales = plugin.scales.scales.log2()
        finite = all(math.isfinite(v) for v in runs["fp16 + PerResblockScaling"].losses)
        lines += [
            f"Training, the same Prior, lr 3e-3, {args.train_steps} steps, same seed and batches "
            "(20-step running mean of the training loss):",
            "",
            "| run | loss at step 20 | final loss | skipped steps | log2 scales (min / max) |",
            "|---|---|---|---|---|",
            f"| fp32 | {fp32[19]:.4f} | {fp32[-1]:.4f} | - | - |",
            f"| fp16 autocast + GradScaler | {amp[19]:.4f} | {amp[-1]:.4f} | - | {math.log2(scaler.get_scale()):.1f} "
            "(one global scale) |",
            f"| fp16 + PerResblockScaling | {fp16[19]:.4f} | {fp16[-1]:.4f} | {plugin.scales.skipped} / "
            f"{plugin.scales.updates} | {scales.min():.3f} / {scales.max():.3f} |",
            "",
            f"All fp16 losses finite: {finite}. Largest gap between the two running means: "
            f"{max(abs(a - b) for a, b in zip(fp32, fp16)):.2e} (GradScaler run against fp32: "
            f"{max(abs(a - b) for a, b in zip(fp32, amp)):.2e}).",
        ]
    command = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    header = (
        f"{datetime.date.today()}, {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
        f"device {d}, {args.threads} thread(s), torch {torch.__version__}, lightning {L.__version__}, "
        f"`python bench/precision.py {command}`."
    )
    text = "\n".join([header, "", *lines])
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n## Per-resblock gradient scaling\n\n" + text + "\n")


if __name__ == "__main__":
    main()
