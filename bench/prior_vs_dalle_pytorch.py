"""Our Prior's transformer against `dalle-pytorch` 1.6.6 at the same size, on the CPU, in the same run.

Sizes (issue 4): width 256, depth 4, 8 heads of 32, text 64, 16x16 image tokens (and 32x32 for generation),
text vocabulary 4096, image codebook 512 (the peer's `DiscreteVAE` default; 6.6 M peer parameters, as in
/work/shared/STACK.md). Measured:

- training tokens/s, batch 8: ours is the real ``Prior.loss`` + backward + ``Prior.configure_optimizers()``
  AdamW step; theirs ``DALLE(text, image_codes, return_loss=True)`` + backward + AdamW (same lr and betas);
- generation image tokens/s, batch 4, at 256 and 1024 image tokens: ours ``Transformer.generate_image_tokens``
  (KV cache, temperature 1, no top-k); theirs ``DALLE.generate_images(cond_scale=1, filter_thres=0.5,
  temperature=1)`` with ``vae.decode`` replaced by the identity (no decoding is timed). With ``cond_scale=1``
  its ``forward_with_cond_scale`` drops the ``cache`` argument, so ``generate_images`` never uses its KV cache
  (and ``cond_scale != 1`` overwrites the caller's text in place and runs two forwards per token). An extra row
  drives its cache directly (``DALLE(text, image, cache=cache)``, full attention only) to show its best case;
- peak memory: ``ru_maxrss`` of a fresh worker process per measurement, and the RSS right after the imports
  (torch, and lightning on our training side), so "above imports" is the measurement's own memory.

Mask pairs at equal attention type: our "paper" schedule (row, column, row, conv 11x11) against the peer's
``('axial_row', 'axial_col', 'axial_row', 'conv_like')`` (its conv_like kernel is 5x5, its default); our "full"
against its ``('full',)``. Its defaults stay on (rotary embeddings, token shift, GEGLU feed-forward).

Each measurement runs in its own worker process (``--worker SPEC``), with the thread count set in the
environment and by ``torch.set_num_threads``; ours and theirs alternate so that both share the machine's noise.
The peer recomputes the whole prefix at every token (no cache), so its generation time (256 and 1024) is estimated
from three timed windows of K tokens (first, middle, last: the prefix is primed through
``generate_images(img=..., num_init_img_tokens=...)`` with ``vae.get_codebook_indices`` replaced), combined by
Simpson's rule, which is exact when the per-token time is quadratic in the prefix length.

The peer lives in its own venv, never in the project (STACK.md, "Install")::

    python3 -m venv /tmp/peer-venv
    /tmp/peer-venv/bin/pip install torch==2.13.0
    /tmp/peer-venv/bin/pip install --no-deps dalle-pytorch==1.6.6 dall-e==0.1
    /tmp/peer-venv/bin/pip install "setuptools>=77.0.3,<81" axial-positional-embedding rotary-embedding-torch \
        "einops>=0.3.2" numpy pillow requests pyyaml tqdm packaging omegaconf attrs

``import dalle_pytorch`` imports ``taming.models.vqgan``, which is absent there: the worker registers placeholder
modules under that name (they are never used: no VQGAN is built). Run (about 15 minutes on 2 busy cores)::

    .venv/bin/python bench/prior_vs_dalle_pytorch.py --threads 2 1 --out bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

PEER_PYTHON = Path("/tmp/peer-venv/bin/python")
WIDTH, DEPTH, HEADS, TEXT_LEN = 256, 4, 8, 64
TEXT_VOCAB, IMAGE_VOCAB = 4096, 512
PEER_SPARSE = ("axial_row", "axial_col", "axial_row", "conv_like")
TEXT_PAD = -100  # lit_dalle.models.transformer.TEXT_PAD (not imported: the peer's worker has no lit_dalle)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _captions(batch: int, seed: int):
    """Caption ids ``[B, L]`` in 1 .. vocab - 1 and each caption's length (the rest is padding)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TEXT_VOCAB, (batch, TEXT_LEN), generator=g)
    lengths = torch.randint(8, TEXT_LEN + 1, (batch,), generator=g)
    pad = torch.arange(TEXT_LEN)[None, :] >= lengths[:, None]  # [B, L]
    return ids, pad


# ------------------------------------------------------------------------------------------------- ours
def ours_train(spec: dict) -> dict:
    import torch

    from lit_dalle.prior import Prior

    rss_import = _rss_mib()
    grid = spec["grid"]
    prior = Prior(
        text_vocab=TEXT_VOCAB, text_len=TEXT_LEN, image_size=grid * 8, image_vocab=IMAGE_VOCAB, downsample=8,
        depth=DEPTH, width=WIDTH, heads=HEADS, mask_schedule=spec["attn"],
    )  # fmt: skip
    opt = prior.configure_optimizers()
    ids, pad = _captions(spec["batch"], 0)
    text = ids.masked_fill(pad, TEXT_PAD)  # [B, L], TEXT_PAD past the caption
    image = torch.randint(0, IMAGE_VOCAB, (spec["batch"], grid * grid), generator=torch.Generator().manual_seed(1))

    def step() -> None:
        loss = prior.loss(text, image)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seconds = _timed(step, spec["warmup"], spec["steps"])
    params = sum(p.numel() for p in prior.transformer.parameters())
    return {"tokens": spec["batch"] * (TEXT_LEN + grid * grid) * spec["steps"], "seconds": seconds,
            "params": params, "rss_import": rss_import}  # fmt: skip


def ours_generate(spec: dict) -> dict:
    import torch

    from lit_dalle.models.transformer import Transformer, TransformerConfig

    rss_import = _rss_mib()
    grid, batch = spec["grid"], spec["batch"]
    config = TransformerConfig(
        text_vocab=TEXT_VOCAB, image_vocab=IMAGE_VOCAB, text_len=TEXT_LEN, grid=grid, depth=DEPTH, width=WIDTH,
        heads=HEADS, mask_schedule=spec["attn"],
    )  # fmt: skip
    model = Transformer(config).eval()
    ids, pad = _captions(batch, 0)
    text = ids.masked_fill(pad, TEXT_PAD)
    g = torch.Generator().manual_seed(0)
    warm_prefix = torch.randint(0, IMAGE_VOCAB, (batch, grid * grid - 8), generator=g)
    model.generate_image_tokens(text, image_prefix=warm_prefix, generator=g)  # warm-up: 8 tokens
    start = time.perf_counter()
    tokens = model.generate_image_tokens(text, temperature=1.0, generator=g)  # [B, N]
    seconds = time.perf_counter() - start
    assert tokens.shape == (batch, grid * grid)
    return {"tokens": batch * grid * grid, "seconds": seconds, "params": sum(p.numel() for p in model.parameters()),
            "rss_import": rss_import, "how": "full image, measured"}  # fmt: skip


def _timed(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------- peer
def _import_peer():
    """Import dalle_pytorch, with placeholder ``taming.models.vqgan`` modules when the real one is missing."""
    placeholders = False
    try:
        import taming.models.vqgan  # noqa: F401
    except ImportError:
        placeholders = True
        for name in ("taming", "taming.models", "taming.models.vqgan"):
            sys.modules[name] = types.ModuleType(name)
        vqgan = sys.modules["taming.models.vqgan"]
        vqgan.VQModel = type("VQModel", (), {})  # never instantiated: no VQGanVAE is built here
        vqgan.GumbelVQ = type("GumbelVQ", (), {})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its __init__ imports the deprecated pkg_resources
        import dalle_pytorch
    return dalle_pytorch, placeholders


def _peer_model(spec: dict):
    dalle_pytorch, placeholders = _import_peer()
    rss_import = _rss_mib()
    grid = spec["grid"]
    # grid = image_size / 2**num_layers; a small VAE (it is frozen and never run: decode is replaced).
    vae = dalle_pytorch.DiscreteVAE(
        image_size=grid * 8, num_tokens=IMAGE_VOCAB, num_layers=3, hidden_dim=16, codebook_dim=64
    )
    dalle = dalle_pytorch.DALLE(
        dim=WIDTH, vae=vae, num_text_tokens=TEXT_VOCAB, text_seq_len=TEXT_LEN, depth=DEPTH, heads=HEADS,
        dim_head=WIDTH // HEADS, attn_types=tuple(spec["attn"]),
    )  # fmt: skip
    assert dalle.image_seq_len == grid * grid
    params = sum(p.numel() for n, p in dalle.named_parameters() if not n.startswith("vae."))
    info = {"params": params, "rss_import": rss_import, "taming_placeholders": placeholders,
            "peer_version": dalle_pytorch.__version__}  # fmt: skip
    return dalle, info


def peer_train(spec: dict) -> dict:
    import torch

    dalle, info = _peer_model(spec)
    ids, pad = _captions(spec["batch"], 0)
    text = ids.masked_fill(pad, 0)  # the peer pads with 0 (its forward swaps in one pad id per position)
    grid = spec["grid"]
    image = torch.randint(0, IMAGE_VOCAB, (spec["batch"], grid * grid), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in dalle.parameters() if p.requires_grad], lr=4.5e-4, betas=(0.9, 0.96))

    def step() -> None:
        loss = dalle(text, image, return_loss=True)  # image codes [B, N]: no VAE encoding
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seconds = _timed(step, spec["warmup"], spec["steps"])
    return {"tokens": spec["batch"] * (TEXT_LEN + grid * grid) * spec["steps"], "seconds": seconds, **info}


class _Stop(Exception):
    pass


def _peer_window(dalle, text, prefix: int, count: int, filter_thres: float) -> float:
    """Seconds for `generate_images` to produce ``count`` image tokens after ``prefix`` primed ones."""
    import torch

    calls = {"n": 0}
    forward = type(dalle).forward

    def counting_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > count:
            raise _Stop
        return forward(dalle, *args, **kwargs)

    dalle.forward = counting_forward
    batch, n_image = text.shape[0], dalle.image_seq_len
    codes = torch.randint(0, IMAGE_VOCAB, (batch, n_image), generator=torch.Generator().manual_seed(2))
    dalle.vae.get_codebook_indices = lambda img: codes  # primes the prefix without running the VAE
    img = torch.zeros(batch, 3, dalle.vae.image_size, dalle.vae.image_size) if prefix else None
    start = time.perf_counter()
    try:
        dalle.generate_images(
            text, img=img, num_init_img_tokens=prefix or None, filter_thres=filter_thres, temperature=1.0,
            cond_scale=1.0,
        )  # fmt: skip
    except _Stop:
        pass
    seconds = time.perf_counter() - start
    del dalle.forward
    return seconds


def peer_generate(spec: dict) -> dict:
    import torch

    dalle, info = _peer_model(spec)
    dalle.eval()
    dalle.vae.decode = lambda codes: codes  # time no decoding: generate_images returns the codes
    ids, pad = _captions(spec["batch"], 0)
    text = ids.masked_fill(pad, 0)
    n_image, batch = dalle.image_seq_len, spec["batch"]
    if spec.get("cache"):
        return {**_peer_cached(dalle, text), **info}
    _peer_window(dalle, text, 0, 2, spec["filter_thres"])  # warm-up
    window = spec.get("window")
    if not window or window >= n_image:
        start = time.perf_counter()
        out = dalle.generate_images(text, filter_thres=spec["filter_thres"], temperature=1.0, cond_scale=1.0)
        seconds = time.perf_counter() - start
        assert out.shape == (batch, n_image) and out.dtype == torch.long
        return {"tokens": batch * n_image, "seconds": seconds, "how": "full image, measured", **info}
    starts = (0, n_image // 2 - window // 2, n_image - window)
    per_token = [_peer_window(dalle, text, s, window, spec["filter_thres"]) / window for s in starts]
    seconds = n_image * (per_token[0] + 4 * per_token[1] + per_token[2]) / 6  # Simpson's rule over the prefix
    how = (f"estimated: {window}-token windows at prefixes {starts}, "
           f"{' / '.join(f'{1e3 * t:.0f}' for t in per_token)} ms per step, Simpson's rule")  # fmt: skip
    return {"tokens": batch * n_image, "seconds": seconds, "how": how, "window_ms": per_token, **info}


def _peer_cached(dalle, text) -> dict:
    """Its KV cache (full attention), driven like `generate_images` does, since that never passes it."""
    import torch
    from dalle_pytorch.dalle_pytorch import gumbel_sample, top_k

    def run(n_tokens: int):
        cache, out = {}, text
        with torch.no_grad():
            for _ in range(n_tokens):
                logits = dalle(out[:, :TEXT_LEN], out[:, TEXT_LEN:], cache=cache)[:, -1]
                sample = gumbel_sample(top_k(logits, thres=0.5), temperature=1.0, dim=-1) - dalle.num_text_tokens
                out = torch.cat((out, sample[:, None]), dim=-1)
        return out

    run(4)  # warm-up
    start = time.perf_counter()
    out = run(dalle.image_seq_len)
    seconds = time.perf_counter() - start
    assert out.shape[1] == TEXT_LEN + dalle.image_seq_len
    return {"tokens": text.shape[0] * dalle.image_seq_len, "seconds": seconds,
            "how": "full image, measured; its cache via DALLE(text, image, cache=...)"}  # fmt: skip


# ----------------------------------------------------------------------------------------------- worker
def worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    tasks = {("ours", "train"): ours_train, ("ours", "gen"): ours_generate,
             ("peer", "train"): peer_train, ("peer", "gen"): peer_generate}  # fmt: skip
    result = tasks[spec["side"], spec["task"]](spec)
    result.update(threads=torch.get_num_threads(), torch=torch.__version__, peak_rss=_peak_rss_mib())
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------- driver
def run_worker(spec: dict) -> dict:
    python = sys.executable if spec["side"] == "ours" else str(PEER_PYTHON)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    start = time.perf_counter()
    proc = subprocess.run(
        [python, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker {spec} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["rate"] = result["tokens"] / result["seconds"]
    print(f"  {spec['side']:4} {spec['task']:5} grid {spec['grid']} {spec['label']:28} threads {result['threads']}: "
          f"{result['rate']:9.1f} tok/s, peak RSS {result['peak_rss']:.0f} MiB "
          f"({time.perf_counter() - start:.0f} s wall)", flush=True)  # fmt: skip
    return result


def comparisons(args: argparse.Namespace) -> list[tuple[str, dict, dict]]:
    """(row name, our spec, their spec) in the order they run."""
    train = {"task": "train", "grid": 16, "batch": 8, "warmup": args.warmup, "steps": args.steps}
    rows = []
    for ours_attn, peer_attn in (("paper", PEER_SPARSE), ("full", ("full",))):
        rows.append((f"training, {ours_attn}", {**train, "attn": ours_attn}, {**train, "attn": peer_attn}))
    for grid in (16, 32):
        gen = {"task": "gen", "grid": grid, "batch": 4, "filter_thres": 0.5, "window": args.window}
        for ours_attn, peer_attn in (("paper", PEER_SPARSE), ("full", ("full",))):
            rows.append((f"generation {grid * grid}, {ours_attn}", {**gen, "attn": ours_attn},
                         {**gen, "attn": peer_attn}))  # fmt: skip
        if grid == 16:  # its cached loop is measured in full; at 1024 tokens that alone takes minutes
            rows.append((f"generation {grid * grid}, full, peer KV cache", {**gen, "attn": "full"},
                         {**gen, "attn": ("full",), "cache": True}))  # fmt: skip
    return rows


def peer_label(spec: dict) -> str:
    attn = "(" + ", ".join(spec["attn"]) + ")"
    return attn + (" + its cache" if spec.get("cache") else "")


def table(results: list[dict]) -> str:
    head = ("| threads | measurement | ours (mask) | theirs (attn_types) | ours tok/s | theirs tok/s | ours/theirs "
            "| goal | ours peak RSS MiB (above imports) | theirs peak RSS MiB (above imports) |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")  # fmt: skip
    lines = []
    for r in results:
        o, p = r["ours"], r["peer"]
        ratio = o["rate"] / p["rate"]
        goal = 1.5 if r["name"].startswith("training") else 20.0
        met = "met" if ratio >= goal else "missed"
        lines.append(
            f"| {o['threads']}/{p['threads']} | {r['name']} | {r['ours_label']} | {r['peer_label']} | "
            f"{o['rate']:,.1f} | {p['rate']:,.1f}{'*' if p.get('how', '').startswith('estimated') else ''} | "
            f"**{ratio:.2f}x** | >= {goal:g}x: {met} | {o['peak_rss']:.0f} ({o['peak_rss'] - o['rss_import']:.0f}) | "
            f"{p['peak_rss']:.0f} ({p['peak_rss'] - p['rss_import']:.0f}) |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="thread counts, each a full pass")
    parser.add_argument("--warmup", type=int, default=2, help="training warm-up steps")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--window", type=int, default=4, help="peer tokens per timed window (0: time whole images)")
    parser.add_argument("--only", default="", help="run only rows whose name contains this")
    parser.add_argument("--out", type=Path, help="append the results section to this markdown file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    if not PEER_PYTHON.exists():
        sys.exit(f"{PEER_PYTHON} not found: create the peer's venv first (see the module docstring / STACK.md)")
    started = time.perf_counter()
    results, notes = [], {}
    for threads in args.threads:
        print(f"threads {threads}", flush=True)
        for i, (name, ours, peer) in enumerate(comparisons(args)):
            if args.only not in name:
                continue
            ours = {**ours, "side": "ours", "threads": threads, "label": ours["attn"]}
            peer = {**peer, "side": "peer", "threads": threads, "label": peer_label(peer)}
            pair = [ours, peer] if i % 2 == 0 else [peer, ours]  # alternate who goes first
            measured = {spec["side"]: run_worker(spec) for spec in pair}
            results.append({"name": name, "ours_label": ours["label"], "peer_label": peer["label"], **measured})
            notes[f"{name}, {threads} thread(s): theirs"] = measured["peer"].get("how", "-")
    first = results[0]
    o, p = first["ours"], first["peer"]
    load = os.getloadavg()[0]
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    text = [
        "## Prior vs dalle-pytorch 1.6.6 (CPU)",
        "",
        f"{datetime.date.today()}, {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
        f"`{python} bench/prior_vs_dalle_pytorch.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
        f"threads {', '.join(map(str, args.threads))} (`torch.set_num_threads` and OMP/MKL_NUM_THREADS, both sides); "
        f"ours torch {o['torch']}, theirs torch {p['torch']} (its own venv, /tmp/peer-venv); "
        f"{time.perf_counter() - started:.0f} s in all; load average {load:.1f} at the end.",
        "",
        f"Width 256, depth 4, 8 heads of 32, text 64, text vocabulary {TEXT_VOCAB}, image codebook {IMAGE_VOCAB}. "
        f"Parameters: ours {o['params']:,}, theirs {p['params']:,} (without its VAE). Training: batch 8, "
        f"{args.warmup} warm-up + {args.steps} timed steps, tokens = 8 x 320 per step. Generation: batch 4, "
        "image tokens/s; ours temperature 1, no top-k (KV cache); theirs `generate_images(cond_scale=1, "
        "filter_thres=0.5, temperature=1)` with `vae.decode` replaced by the identity (no decoding timed). "
        "Peak RSS: `ru_maxrss` of a fresh process per measurement; in parentheses, minus the RSS after the imports "
        "(our training imports lightning).",
        "",
        table(results),
        f"Theirs: `taming.models.vqgan` placeholder modules registered: {p.get('taming_placeholders')} (the real "
        "package is not installed; no VQGAN is used). * = estimated from timed windows, not a full run:",
    ]
    text += [f"- {k}: {v}" for k, v in notes.items() if v.startswith("estimated")]
    section = "\n".join(text) + "\n"
    print("\n" + section)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + section)


if __name__ == "__main__":
    main()
