"""DVAE throughput: lit_dalle vs the reference `dall-e` 0.1 modules at the same sizes, in the same run.

Measures images/s of
- a training step (Gumbel-softmax relaxation, logit-Laplace NLL + KL, backward, AdamW step),
- `encode` (argmax tokens of images) and
- `decode` (images from tokens),
for lit_dalle's `DVAE` and for `dall_e.Encoder` / `dall_e.Decoder` (the released architecture; it has no
training code, so its training step is the same loss written around its modules). The two run
interleaved (A, B, A, B, ...) and the median of the repeats is reported, so load from other processes
hits both alike.

    python bench/dvae_throughput.py                                   # CPU, 64 px, n_hid 64
    python bench/dvae_throughput.py --device cuda --autocast bf16 --channels-last \
        --n-hid 256 --vocab-size 8192 --resolution 256 --batch-size 16

Needs `pip install --no-deps dall-e==0.1` and `pip install attrs requests` (what dall_e imports).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lit_dalle.dvae import DVAE


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def _reference_loss(enc, dec, images: torch.Tensor, tau: float, beta: float, eps: float = 0.1) -> torch.Tensor:
    """The same objective as `DVAE.compute_loss`, written around the reference modules."""
    x = (1 - 2 * eps) * images + eps
    logits = enc(x).float()
    z = F.gumbel_softmax(logits, tau=tau, hard=False, dim=1)
    mu, log_b = dec(z).float().chunk(2, dim=1)
    nll = math.log(2) + log_b + torch.log(x * (1 - x)) + (torch.logit(x) - mu).abs() * torch.exp(-log_b)
    log_q = F.log_softmax(logits, dim=1)
    kl = (log_q.exp() * (log_q + math.log(logits.shape[1]))).sum(1)
    return nll.mean() + beta * kl.mean() / (images[0].numel() / kl[0].numel())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--n-hid", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--n-blk-per-group", type=int, default=2)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=3, help="timed iterations per repeat")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import attr
    import dall_e

    device = torch.device(args.device)
    torch.manual_seed(0)
    sizes = dict(n_hid=args.n_hid, vocab_size=args.vocab_size, n_blk_per_group=args.n_blk_per_group)
    ours = DVAE(**sizes, n_init=128, group_count=4, temperature=0.5, kl_weight=6.6).to(device)
    with attr.validators.disabled():  # the reference wants n_hid >= 64 and vocab >= 512; allow smaller
        ref_enc = dall_e.Encoder(**sizes, device=device)  # its parameters require grad anyway (STACK.md)
        ref_dec = dall_e.Decoder(**sizes, n_init=128, device=device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.channels_last:
        ours, ref_enc, ref_dec = (m.to(memory_format=fmt) for m in (ours, ref_enc, ref_dec))
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for m in (ref_enc, ref_dec) for p in m.parameters())
    assert n_ours == n_ref, (n_ours, n_ref)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast)

    def amp() -> contextlib.AbstractContextManager:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    scaler = torch.amp.GradScaler(device.type, enabled=args.autocast == "fp16")
    images = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device)
    images = images.contiguous(memory_format=fmt)
    tokens = ours.encode(images)
    opt_ours = ours.configure_optimizers()
    opt_ref = torch.optim.AdamW([*ref_enc.parameters(), *ref_dec.parameters()], lr=1e-4, weight_decay=1e-4)

    def train(loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> None:
        with amp():
            loss = loss_fn()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def ref_encode() -> torch.Tensor:
        with torch.no_grad(), amp():
            return ref_enc(dall_e.map_pixels(images)).argmax(1)

    def ref_decode() -> torch.Tensor:
        with torch.no_grad(), amp():
            z = F.one_hot(tokens, args.vocab_size).permute(0, 3, 1, 2).float().contiguous(memory_format=fmt)
            return dall_e.unmap_pixels(torch.sigmoid(ref_dec(z)[:, :3].float()))

    def our_encode() -> torch.Tensor:
        with amp():
            return ours.encode(images)

    def our_decode() -> torch.Tensor:
        with amp():
            return ours.decode(tokens)

    cases = {
        "train step": (
            lambda: train(lambda: ours.compute_loss(images)["loss"], opt_ours),
            lambda: train(lambda: _reference_loss(ref_enc, ref_dec, images, 0.5, 6.6), opt_ref),
        ),
        "encode": (our_encode, ref_encode),
        "decode": (our_decode, ref_decode),
    }
    rows = []
    for name, (fn_ours, fn_ref) in cases.items():
        fn_ours(), fn_ref()  # warm-up
        t_ours, t_ref = [], []
        for _ in range(args.repeats):
            t_ours.append(_time(fn_ours, args.iters, device))
            t_ref.append(_time(fn_ref, args.iters, device))
        ips_ours = args.batch_size / statistics.median(t_ours)
        ips_ref = args.batch_size / statistics.median(t_ref)
        rows.append((name, ips_ours, ips_ref, ips_ours / ips_ref))

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"device {device} ({machine}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"autocast {args.autocast}, channels_last {args.channels_last}; n_hid {args.n_hid}, "
        f"vocab {args.vocab_size}, {args.n_blk_per_group} blocks/group, {args.resolution} px, "
        f"batch {args.batch_size}, {n_ours / 1e6:.2f} M parameters each; median of {args.repeats} x "
        f"{args.iters} iterations\n"
    )
    print("| operation | lit_dalle images/s | dall_e 0.1 images/s | ratio |")
    print("|---|---:|---:|---:|")
    for name, a, b, r in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {r:.2f} |")


if __name__ == "__main__":
    main()
