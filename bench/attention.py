"""Attention kernels per mask kind at the paper's stream size (256 text + 32x32 image tokens = 1280 positions).

For each mask kind (full, row, column, conv) and for plain causal SDPA (``is_causal=True``, no mask tensor):
forward and forward + backward time of one attention op, batch x heads x 1280 x head_dim, and the fraction
of the attention matrix the mask keeps (of all T*T entries, of the causal half, and of 128x128 tiles, or
``--block-size``, which is what a block-sparse kernel computes). With ``--flex`` (default on CUDA) it also
times FlexAttention (``torch.compile``d, block-sparse ``BlockMask`` from the same masks); on CPU only its
forward exists.

    python bench/attention.py [--device cpu|cuda] [--batch 2] [--heads 8] [--reps 3] [--flex] [--out bench/RESULTS.md]

CPU: fp32; CUDA: bf16 (``--dtype`` to change). The "paper mix" row weights the kinds as the paper's 64 layers
use them (47 row, 16 column, 1 conv), per layer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lit_dalle.models.masks import (
    block_density,
    build_mask,
    flex_block_mask,
    has_flex_attention,
    mask_density,
    resolve_schedule,
)

KINDS = ["full", "row", "column", "conv"]


def timed(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def fwd_bwd(attend: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable:
    """A closure running ``attend`` forward and backward (a sum loss)."""

    def run() -> None:
        for t in (q, k, v):
            t.grad = None
        attend(q, k, v).float().sum().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 CPU, bf16 CUDA)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--text-len", type=int, default=256)
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--kernel", type=int, default=11)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=128, help="FlexAttention tile side")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--flex", action="store_true", help="also time FlexAttention (always on CUDA)")
    parser.add_argument("--out", default=None, help="append the table to this markdown file")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    flex = (args.flex or device.type == "cuda") and has_flex_attention()
    flex_backward = device.type == "cuda"  # FlexAttention has no backward on CPU
    size = args.text_len + args.grid**2
    shape = (args.batch, args.heads, size, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    qd, kd, vd = q.detach(), k.detach(), v.detach()  # forward-only timings (CPU flex refuses requires_grad)
    if flex:
        from torch.nn.attention.flex_attention import flex_attention

        compiled_flex = torch.compile(flex_attention, dynamic=False)

    rows = []
    with torch.no_grad():
        fwd = timed(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True), args.reps, device)
    causal = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
    both = timed(fwd_bwd(causal, q, k, v), args.reps, device)
    rows.append({"kind": "causal (`is_causal`)", "sdpa_fwd": fwd, "sdpa_both": both})
    for kind in KINDS:
        mask = build_mask(kind, args.text_len, args.grid, args.kernel).to(device)
        row = {
            "kind": kind,
            "full": mask_density(kind, args.text_len, args.grid, args.kernel),
            "causal": mask_density(kind, args.text_len, args.grid, args.kernel, of="causal"),
            "tiles": block_density(kind, args.text_len, args.grid, args.kernel, args.block_size),
        }
        attend = lambda a, b, c, m=mask: F.scaled_dot_product_attention(a, b, c, attn_mask=m)  # noqa: E731
        with torch.no_grad():
            row["sdpa_fwd"] = timed(lambda fn=attend: fn(qd, kd, vd), args.reps, device)
        row["sdpa_both"] = timed(fwd_bwd(attend, q, k, v), args.reps, device)
        if flex:
            block_mask = flex_block_mask(
                kind, args.text_len, args.grid, args.kernel, device=device, block_size=args.block_size
            )
            flex_attend = lambda a, b, c, bm=block_mask: compiled_flex(a, b, c, block_mask=bm)  # noqa: E731
            with torch.no_grad():
                start = time.perf_counter()
                flex_attend(qd, kd, vd)
                row["flex_first"] = time.perf_counter() - start  # includes compiling (first kind only)
                row["flex_fwd"] = timed(lambda fn=flex_attend: fn(qd, kd, vd), args.reps, device)
            if flex_backward:
                row["flex_both"] = timed(fwd_bwd(flex_attend, q, k, v), args.reps, device)
        rows.append(row)
        print(row, flush=True)

    counts = Counter(resolve_schedule("paper", 64))
    by_kind = {r["kind"]: r for r in rows}
    mix = {"kind": "paper mix (47 row, 16 column, 1 conv)"}
    for key in ("full", "causal", "tiles", "sdpa_fwd", "sdpa_both", "flex_fwd", "flex_both"):
        if all(key in by_kind[kind] for kind in counts):
            mix[key] = sum(n * by_kind[kind][key] for kind, n in counts.items()) / sum(counts.values())
    rows.append(mix)

    def cell(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "-"

    header = f"| mask | of T*T | of causal | {args.block_size}-tiles | SDPA fwd ms | SDPA fwd+bwd ms |"
    rule = "|---|---|---|---|---|---|"
    if flex:
        header += " flex fwd ms | flex fwd+bwd ms |"
        rule += "---|---|"
    table = [header, rule]
    for r in rows:
        line = f"| {r['kind']} | {cell(r, 'full', '.3f')} | {cell(r, 'causal', '.3f')} | {cell(r, 'tiles', '.3f')} |"
        line += f" {cell(r, 'sdpa_fwd', '.1f')} | {cell(r, 'sdpa_both', '.1f')} |"
        if flex:
            line += f" {cell(r, 'flex_fwd', '.1f')} | {cell(r, 'flex_both', '.1f')} |"
        table.append(line)
    text = "\n".join(table)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()}-core CPU"
    setup = (
        f"batch {args.batch}, {args.heads} heads of {args.head_dim}, {args.text_len} text + {args.grid}x{args.grid} "
        f"image = {size} positions, conv kernel {args.kernel}, {str(dtype).split('.')[-1]}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.reps}"
    )
    if device.type == "cpu":  # other jobs on the machine slow every number here: say how busy it was
        setup += f", load average {os.getloadavg()[0]:.1f} at the end"
    print(setup)
    print(text)
    if flex and "flex_first" in rows[1]:
        print(f"first flex call (compile included): {rows[1]['flex_first']:.1f} s")
    if args.out:
        title = "Attention masks (CPU)" if device.type == "cpu" else f"Attention masks ({machine})"
        command = " ".join(["python bench/attention.py", *sys.argv[1:]])
        with open(args.out, "a") as f:
            f.write(f"\n## {title}\n\n{time.strftime('%Y-%m-%d')}, {machine}, `{command}`; {setup}.\n\n{text}\n")


if __name__ == "__main__":
    main()
