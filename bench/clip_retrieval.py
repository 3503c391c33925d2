"""Caption -> image retrieval of a contrastive scorer on the embedded data: top-1 among pools of 100 images.

For the validation split (attribute combinations seen in training) and the held-out split (a colour-shape
pair never trained on), embed ``--num`` (caption, image) pairs and, in each consecutive pool of 100,
count a hit when the image scored highest for a caption has that caption. Chance is ~1%.

    python bench/clip_retrieval.py --scorer runs/clip/checkpoints/last.ckpt [--num 1000]
"""

from __future__ import annotations

import argparse
import json

import torch

from lit_dalle.contrastive import retrieval_top1
from lit_dalle.evaluate import evaluation_set
from lit_dalle.rerank import load_scorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scorer", required=True, help="a Contrastive checkpoint or a Hugging Face CLIP folder")
    parser.add_argument("--num", type=int, default=1000, help="pairs per split (a multiple of --pool)")
    parser.add_argument("--pool", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    scorer = load_scorer(args.scorer)
    results = {}
    for split in ("val", "heldout"):
        captions, images = evaluation_set(split, args.num, args.resolution)
        text = scorer.embed_texts(captions)
        image = torch.cat([scorer.embed_images(images[s : s + 200]) for s in range(0, len(images), 200)])
        results[split] = round(float(retrieval_top1(text, image, captions, args.pool)), 4)
    print(json.dumps({"scorer": args.scorer, "pairs_per_split": args.num, "pool": args.pool, "top1": results}))


if __name__ == "__main__":
    main()
