"""Do generated images match their captions? Attribute accuracy of a Prior's samples on the embedded data.

For captions of the embedded dataset's validation split (attribute combinations seen in training) and of
its held-out split (a (colour, shape) pair never trained on, PAPER.md's zero-shot claim in miniature),
sample one image per caption (PAPER.md E.1: temperature 1, no top-k), decode it with the Prior's DVAE,
and score it with the attribute recogniser against the caption. As references, the same scores for the
real images and for the DVAE's reconstructions of them bound what the Prior can reach.

    python bench/prior_quality.py --ckpt runs/prior/checkpoints/last.ckpt [--num 200] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from lit_dalle.data import shapes
from lit_dalle.data.recognize import score_batch
from lit_dalle.generate import load_prior

KEYS = ("color", "shape", "size", "relation", "count", "all")


def evaluate(prior: torch.nn.Module, split: str, num: int, batch: int, seed: int) -> dict[str, dict[str, float]]:
    """Scores of real images, DVAE reconstructions and Prior samples for ``num`` captions of ``split``."""
    resolution = prior.hparams.image_size
    samples = list(shapes.generate(split, num, seed=seed + 1, resolution=resolution))  # type: ignore[arg-type]
    captions = [s.caption for s in samples]
    real = torch.stack([torch.from_numpy(np.array(s.image)).permute(2, 0, 1) for s in samples])
    real = real.float() / 255
    recon, generated = [], []
    for start in range(0, num, batch):
        chunk = captions[start : start + batch]
        recon.append(prior.dvae.reconstruct(real[start : start + batch].to(prior.device)).cpu())
        generated.append(prior.generate(chunk, seed=seed + start).cpu())
    return {
        "real images": score_batch(real, captions),
        "DVAE reconstructions": score_batch(torch.cat(recon), captions),
        "Prior samples (best of 1)": score_batch(torch.cat(generated), captions),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--num", type=int, default=200, help="captions per split")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="append the table to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prior = load_prior(args.ckpt)
    start = time.time()
    results = {split: evaluate(prior, split, args.num, args.batch, args.seed) for split in ("val", "heldout")}
    elapsed = time.time() - start
    lines = ["| split | images | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    for split, rows in results.items():
        name = {"val": "seen combinations (val)", "heldout": "held-out combinations"}[split]
        for kind, scores in rows.items():
            lines.append(f"| {name} | {kind} | " + " | ".join(f"{scores[k]:.3f}" for k in KEYS) + " |")
    table = "\n".join(lines)
    print(table)
    print(json.dumps({"seconds": round(elapsed, 1), "captions_per_split": args.num}))
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n## Prior samples vs captions ({time.strftime('%Y-%m-%d')}, `{args.ckpt}`)\n\n")
            f.write(f"`python bench/prior_quality.py --ckpt {args.ckpt} --num {args.num}`; {args.num} captions per ")
            f.write(f"split, one sample each (temperature 1), scored by the attribute recogniser.\n\n{table}\n")


if __name__ == "__main__":
    main()
