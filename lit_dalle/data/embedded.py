"""The embedded dataset, written as real tar shards into a cache folder on first use.

Every shipped config trains on it with no download: captioned images of coloured shapes from
``shapes.py`` (with attribute combinations held out of training), written through the same
``write_shards`` that ``prepare`` uses, so the quickstart exercises the real pipeline. The cache folder
is ``$LIT_DALLE_CACHE``, else ``$XDG_CACHE_HOME/lit_dalle``, else ``~/.cache/lit_dalle`` — never the
repository. A finished dataset is moved into place atomically, so an interrupted run leaves no half set.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lit_dalle.data import shapes
from lit_dalle.data.shards import write_shards

SPLITS = ("train", "val", "heldout")
"""The embedded splits: training, validation (seen combinations) and held-out combinations."""

FORMAT_VERSION = 1
"""Bumped whenever the generator's output changes, so stale caches are not reused."""


@dataclass
class EmbeddedShapes:
    """Size and location of the embedded shapes dataset (used when no shards are given)."""

    train_samples: int = 20_000
    """Samples in the training split (seen attribute combinations only)."""
    val_samples: int = 1_000
    """Samples in the validation split (seen combinations, other seeds)."""
    heldout_samples: int = 1_000
    """Samples in the held-out split (each has an attribute combination never trained on)."""
    resolution: int | None = None
    """Side of the rendered square images, in pixels; None renders at the data module's resolution."""
    seed: int = 0
    """Seed of the generator; the dataset is a pure function of these fields."""
    samples_per_shard: int = 1_000
    """Samples per tar shard."""
    cache_dir: str | None = None
    """Where to write the shards; None means $LIT_DALLE_CACHE or ~/.cache/lit_dalle."""


def cache_root(cache_dir: str | None = None) -> Path:
    """The folder the embedded dataset lives in (see the module docstring for the lookup order)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("LIT_DALLE_CACHE"):
        return Path(os.environ["LIT_DALLE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "lit_dalle"


def dataset_dir(cfg: EmbeddedShapes) -> Path:
    """The folder of one embedded dataset, named by everything that determines its content."""
    name = (
        f"shapes-v{FORMAT_VERSION}-r{cfg.resolution or 64}-s{cfg.seed}-"
        f"{cfg.train_samples}-{cfg.val_samples}-{cfg.heldout_samples}-p{cfg.samples_per_shard}"
    )
    return cache_root(cfg.cache_dir) / name


def _records(split: str, num: int, cfg: EmbeddedShapes, bar: tqdm) -> Iterator[dict[str, Any]]:
    """WebDataset records of one split, advancing the progress bar."""
    for sample in shapes.generate(split, num, seed=cfg.seed, resolution=cfg.resolution or 64):
        bar.update(1)
        yield {
            "__key__": sample.key,
            "png": sample.image,
            "txt": sample.caption,
            "json": sample.scene.to_json(),
        }


def ensure_embedded(cfg: EmbeddedShapes, progress: bool = True) -> dict[str, Path]:
    """Return the shard folder of each split, generating the dataset first if it is not cached.

    Args:
        cfg: which embedded dataset.
        progress: show a progress bar while generating.
    """
    target = dataset_dir(cfg)
    if not (target / "done.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        sizes = {"train": cfg.train_samples, "val": cfg.val_samples, "heldout": cfg.heldout_samples}
        try:
            with tqdm(total=sum(sizes.values()), desc=f"embedded shapes -> {target}", disable=not progress) as bar:
                for split, num in sizes.items():
                    write_shards(_records(split, num, cfg, bar), tmp / split, max_count=cfg.samples_per_shard)
            (tmp / "done.json").write_text(json.dumps(asdict(cfg), indent=1))
            try:
                os.replace(tmp, target)
            except OSError:  # another process finished first; its copy is identical
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return {split: target / split for split in SPLITS}
