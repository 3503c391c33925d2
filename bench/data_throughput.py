"""Data loading throughput: decoded + augmented samples/s per loader worker.

Measures the TextImageDataModule's training stream (tar read, image decode, the paper's augmentation,
batching) at 64 px and 256 px targets, on the embedded shapes shards (rendered at the target size) and on
shards of 512x512 JPEGs (smooth synthetic photos, ~quality 90). One worker in the main process gives the
per-worker rate; a run with 2 workers shows the scaling on this machine.

    python bench/data_throughput.py [--samples 600] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from lit_dalle.data import EmbeddedShapes, TextImageDataModule, write_shards


def photo_like_jpeg(seed: int, side: int = 512) -> bytes:
    """A smooth image with a few shapes and mild noise, JPEG-encoded like a typical web photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    base = np.stack([np.sin(3 * x + rng.uniform(0, 6)), np.cos(2 * y + rng.uniform(0, 6)), x * y], -1)
    image = Image.fromarray(((base * 0.5 + 0.5) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, side - 64, 2)
        draw.ellipse(
            [x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 200)], fill=tuple(rng.integers(0, 256, 3))
        )
    array = np.asarray(image).astype(np.int16) + rng.integers(-6, 7, (side, side, 3))
    buf = io.BytesIO()
    Image.fromarray(array.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def rate(data: TextImageDataModule, samples: int) -> float:
    """Samples per second over the first ``samples`` training samples (after one warm-up batch)."""
    data.setup("fit")
    loader = iter(data.train_dataloader())
    next(loader)
    seen, start = 0, time.perf_counter()
    for batch in loader:
        seen += len(batch["key"])
        if seen >= samples:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--out", type=str, default=None, help="append the table to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a loader worker is one thread; measure that
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    os.environ["LIT_DALLE_CACHE"] = str(tmp / "cache")
    n = args.samples + 200
    jpeg_dir = tmp / "jpeg512"
    write_shards(
        ({"__key__": f"{i:06d}", "jpg": photo_like_jpeg(i), "txt": "a photo"} for i in range(n)),
        jpeg_dir,
        max_count=200,
    )
    rows = []
    for source in ["embedded", "jpeg 512x512"]:
        for resolution in [64, 256]:
            for augment in ["dvae", "prior"]:
                for workers in [0, 2]:
                    kwargs = dict(
                        resolution=resolution, batch_size=20, num_workers=workers, augment=augment, shuffle_buffer=50
                    )
                    if source == "embedded":
                        embedded = EmbeddedShapes(
                            train_samples=n, val_samples=20, heldout_samples=20, samples_per_shard=200
                        )
                        data = TextImageDataModule(embedded=embedded, **kwargs)
                        data.prepare_data()
                    else:
                        data = TextImageDataModule(train_shards=str(jpeg_dir), **kwargs)
                    r = rate(data, args.samples)
                    rows.append((source, resolution, augment, max(workers, 1), r, r / max(workers, 1)))
                    print(f"{source:14s} {resolution:4d}px {augment:6s} workers={max(workers, 1)}: {r:8.1f} samples/s")
    table = ["| source | target | recipe | workers | samples/s | per worker |", "|---|---|---|---|---|---|"]
    table += [f"| {s} | {r} px | {a} | {w} | {v:.0f} | {v / w:.0f} |" for s, r, a, w, v, _ in rows]
    text = "\n".join(table)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            stamp = f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()}-core CPU"
            f.write(f"\n## Data throughput ({stamp}, `python bench/data_throughput.py`)\n\n")
            f.write(
                "Decode + augment + batch, from tar shards; `workers=1` runs in the main process.\n\n" + text + "\n"
            )


if __name__ == "__main__":
    main()
