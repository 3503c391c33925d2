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
