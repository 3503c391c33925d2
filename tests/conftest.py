"""Shared fixtures: tiny tar shards built on the fly, and an isolated cache for the embedded dataset."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # so tests and configs can name `tiny_model.TinyModel` by import path

from lit_dalle.data.shards import write_shards  # noqa: E402

# Tiny models on a 2-core machine shared with loader workers and DDP processes: one intra-op thread per
# process avoids OpenMP oversubscription (measured here: a tiny Prior step fell from ~1 s to ~10 ms).
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point the embedded-dataset cache at a session folder (never the user's cache or the repo)."""
    os.environ["LIT_DALLE_CACHE"] = str(tmp_path_factory.mktemp("lit_dalle_cache"))


def image_bytes(width: int = 48, height: int = 40, fmt: str = "PNG", seed: int = 0) -> bytes:
    """Encode a random RGB image."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def good_record(key: str, fmt: str = "png", seed: int = 0, caption: str = "A Caption") -> dict[str, Any]:
    """A valid WebDataset record with an image of the given format."""
    pil_fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
    return {"__key__": key, fmt: image_bytes(fmt=pil_fmt, seed=seed), "txt": caption}


@pytest.fixture
def make_shards(tmp_path: Path) -> Callable[..., list[str]]:
    """Write records into ``tmp_path/<name>/shard-*.tar`` and return the shard paths."""

    def make(records: list[dict[str, Any]], name: str = "shards", per_shard: int = 10) -> list[str]:
        return write_shards(records, tmp_path / name, max_count=per_shard)

    return make


SMALL_SHAPES = {"resolution": 32, "train_samples": 4000, "val_samples": 400, "heldout_samples": 400}
"""A small embedded dataset (32 px) for tests that train on real captions and images."""


@pytest.fixture(scope="session")
def trained_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `Contrastive` checkpoint trained for 250 updates on the small embedded dataset (~30 s on one thread)."""
    import lightning as L

    from lit_dalle import Contrastive, EmbeddedShapes, TextImageDataModule

    root = tmp_path_factory.mktemp("clip")
    L.seed_everything(0)
    data = TextImageDataModule(
        resolution=32, batch_size=64, val_batch_size=100, num_workers=0, augment="center",
        embedded=EmbeddedShapes(**SMALL_SHAPES),
    )  # fmt: skip
    model = Contrastive(image_size=32, text_len=16, embed_dim=64, text_width=64, text_heads=2, lr=3e-3, warmup_steps=20)
    trainer = L.Trainer(
        max_steps=250, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(root / "clip.ckpt")
    return root / "clip.ckpt"
