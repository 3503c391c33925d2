"""Finding and writing WebDataset tar shards.

Shards follow the layout img2dataset writes: members ``KEY.jpg|jpeg|png|webp`` and ``KEY.txt``, with an
optional ``KEY.json``. A shard *spec* is what a user types in YAML: a path, a brace pattern
(``data/{000000..000099}.tar``), a glob (``data/*.tar``), a folder of ``.tar`` files, a list of any of
these, or a remote URL / ``pipe:`` command (passed through unchecked, since it cannot be listed locally).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import braceexpand
import webdataset as wds

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Image members a sample may carry, in the order they are looked up."""

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")


class ShardSpecError(ValueError):
    """A shard spec that names no readable shard; raised before training starts."""


def _expand_one(pattern: str) -> list[str]:
    """Expand one brace/glob/folder/file pattern into shard paths, or raise naming the pattern."""
    if pattern.startswith(_REMOTE_PREFIXES):
        return list(braceexpand.braceexpand(pattern))
    found: list[str] = []
    for item in braceexpand.braceexpand(os.path.expanduser(pattern)):
        if glob.has_magic(item):
            found.extend(sorted(p for p in glob.glob(item) if os.path.isfile(p)))
        elif os.path.isdir(item):
            found.extend(sorted(str(p) for p in Path(item).glob("*.tar")))
            if not found:
                raise ShardSpecError(f"shard folder {item!r} (from {pattern!r}) holds no .tar file")
        elif os.path.isfile(item):
            found.append(item)
        else:
            raise ShardSpecError(
                f"shard {item!r} (from pattern {pattern!r}) does not exist; check the path, or create "
                "shards with `python -m lit_dalle prepare --from-folder DIR --out DIR`"
            )
    if not found:
        raise ShardSpecError(f"shard pattern {pattern!r} matches no file")
    return found


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Expand a shard spec into a sorted, de-duplicated list of shard paths.

    Args:
        spec: a path, brace pattern, glob or folder, a comma-free list of them, or remote URLs.

    Returns:
        The shard paths, in a stable order (first occurrence wins).

    Raises:
        ShardSpecError: when any pattern matches nothing, naming that pattern.
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns:
        raise ShardSpecError("empty shard spec: give a path, a brace pattern, a glob or a folder")
    shards: dict[str, None] = {}
    for pattern in patterns:
        for path in _expand_one(str(pattern)):
            shards.setdefault(path, None)
    return list(shards)


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    prefix: str = "shard",
    max_count: int = 1000,
) -> list[str]:
    """Write samples as tar shards ``{out_dir}/{prefix}-000000.tar, ...``.

    This is the one shard writer of the project: the embedded dataset and ``prepare`` both use it.

    Args:
        samples: WebDataset records: ``{"__key__": str, "png"|"jpg"|...: bytes or PIL image,
            "txt": str, "json": dict (optional)}``. Images given as bytes are stored as they are.
        out_dir: folder to write into (created if missing).
        prefix: shard file name prefix.
        max_count: samples per shard.

    Returns:
        The paths of the shards written.
    """
    os.makedirs(out_dir, exist_ok=True)
    pattern = os.path.join(str(out_dir), f"{prefix}-%06d.tar")
    written: list[str] = []
    with wds.ShardWriter(pattern, maxcount=max_count, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
            if sink.fname and (not written or written[-1] != sink.fname):
                written.append(sink.fname)
    return written
