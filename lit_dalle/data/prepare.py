"""``python -m lit_dalle prepare``: a folder of images with same-stem ``.txt`` captions -> tar shards.

That folder layout is the convention other DALL-E implementations use (``cat.jpg`` + ``cat.txt``).
Images keep their original bytes (no re-encoding); each is test-decoded first and an unreadable one is
reported and skipped, as is an image without a caption. Shards are written to a temporary folder and
swapped in whole, with deterministic names and keys, so re-running never duplicates samples; a manifest
of the source files lets an unchanged folder be skipped outright.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lit_dalle.data.decode import decode_raw_image
from lit_dalle.data.shards import IMAGE_EXTENSIONS, write_shards

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def find_pairs(folder: Path) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """Images under ``folder`` (recursively, sorted) with their same-stem caption, and those without one."""
    pairs, orphans = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix.lower().lstrip(".") not in IMAGE_EXTENSIONS:
            continue
        caption = path.with_suffix(".txt")
        (pairs.append((path, caption)) if caption.is_file() else orphans.append(path))
    return pairs, orphans


def make_key(relative: Path, taken: set[str]) -> str:
    """A unique shard key from a relative path (no dots or slashes: WebDataset splits keys on them)."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", str(relative.with_suffix("")))
    key, n = base, 1
    while key in taken:
        key, n = f"{base}_{n}", n + 1
    taken.add(key)
    return key


def _fingerprint(pairs: list[tuple[Path, Path]], samples_per_shard: int) -> str:
    """A hash of the source listing (names, sizes, modification times) and the shard size."""
    h = hashlib.sha256(str(samples_per_shard).encode())
    for image, caption in pairs:
        for p in (image, caption):
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _records(pairs: list[tuple[Path, Path]], root: Path, stats: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """WebDataset records for the readable pairs; unreadable images are reported and counted."""
    taken: set[str] = set()
    for image_path, caption_path in tqdm(pairs, desc="prepare", unit="img"):
        data = image_path.read_bytes()
        try:
            decode_raw_image(data)
        except ValueError as err:
            log.warning("skipping unreadable image %s: %s", image_path, str(err).splitlines()[-1][:100])
            stats["unreadable"].append(str(image_path))
            continue
        ext = image_path.suffix.lower().lstrip(".")
        stats["written"] += 1
        yield {
            "__key__": make_key(image_path.relative_to(root), taken),
            ext: data,
            "txt": caption_path.read_bytes(),
            "json": {"source": str(image_path.relative_to(root))},
        }


def prepare(from_folder: str, out: str, samples_per_shard: int = 1000) -> dict[str, Any]:
    """Convert a folder of images with same-stem .txt captions into WebDataset tar shards.

    Args:
        from_folder: folder searched recursively for *.jpg|jpeg|png|webp, each with a same-stem .txt.
        out: folder that receives shard-000000.tar, ... and manifest.json (its old shards are replaced).
        samples_per_shard: samples per tar shard.

    Returns:
        The manifest: counts of written, unreadable and caption-less images, and the shard names.
    """
    root = Path(from_folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--from-folder {from_folder!r} is not a folder of images with .txt captions")
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard={samples_per_shard} must be a positive integer")
    pairs, orphans = find_pairs(root)
    if not pairs:
        raise FileNotFoundError(f"--from-folder {from_folder!r} holds no image with a same-stem .txt caption")
    for orphan in orphans:
        log.warning("skipping %s: no caption file %s", orphan, orphan.with_suffix(".txt").name)
    out_dir = Path(out).expanduser()
    fingerprint = _fingerprint(pairs, samples_per_shard)
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("fingerprint") == fingerprint:
            print(f"{out_dir}: up to date ({old['written']} samples in {len(old['shards'])} shards)")
            return old
    stats: dict[str, Any] = {"written": 0, "unreadable": [], "no_caption": [str(p) for p in orphans]}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
    try:
        shards = write_shards(_records(pairs, root, stats), tmp, max_count=samples_per_shard)
        for old_shard in out_dir.glob("shard-*.tar"):
            old_shard.unlink()
        for shard in shards:
            os.replace(shard, out_dir / Path(shard).name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest = {"fingerprint": fingerprint, "shards": [Path(s).name for s in shards], **stats}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    print(
        f"{out_dir}: wrote {stats['written']} samples in {len(shards)} shards; skipped "
        f"{len(stats['unreadable'])} unreadable and {len(orphans)} caption-less images"
    )
    return manifest
