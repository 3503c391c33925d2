"""Image tokens for the Prior: a frozen DVAE, the record that pins it, and pre-tokenized shards.

The Prior never stores its image tokenizer (DESIGN.md): it records which DVAE it was trained with (path,
content hash, codebook size, downsampling factor) and refuses another one with a message saying what
differs. ``python -m lit_dalle tokenize`` encodes shards once with a frozen DVAE into pre-tokenized
shards (``KEY.tokens.npy`` + ``KEY.txt``), so the Prior does not run the DVAE every step; each output
folder carries ``tokenize.json`` with the same DVAE record, checked the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from tqdm.auto import tqdm

from lit_dalle.data.augment import CenterResize
from lit_dalle.data.dataset import ShardDataset
from lit_dalle.data.decode import TOKENS_MEMBER
from lit_dalle.data.shards import expand_shards

MANIFEST = "tokenize.json"


@dataclass(frozen=True)
class DVAERecord:
    """What identifies the DVAE that produced a Prior's image tokens."""

    path: str
    """Where the checkpoint was loaded from (informative; the hash is what is compared)."""
    sha256: str
    """Content hash of the checkpoint file."""
    vocab_size: int
    """Codebook size K (image token ids are 0 .. K - 1)."""
    downsample: int
    """Pixels per token along each side (the paper: 8)."""

    def mismatch(self, other: DVAERecord) -> str | None:
        """A sentence naming what differs from ``other``, or None when they are the same DVAE."""
        diffs = [
            f"{name}: {getattr(self, name)} vs {getattr(other, name)}"
            for name in ("sha256", "vocab_size", "downsample")
            if getattr(self, name) != getattr(other, name)
        ]
        return "; ".join(diffs) or None


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_frozen_dvae(path: str | Path, use_ema: bool = True) -> tuple[torch.nn.Module, DVAERecord]:
    """Load a DVAE checkpoint for tokenizing: EMA weights when the checkpoint has them, eval mode, frozen.

    Raises:
        FileNotFoundError: naming the path, when it does not exist.
    """
    from lit_dalle.callbacks.ema import load_with_ema
    from lit_dalle.dvae import DVAE

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"DVAE checkpoint {str(path)!r} not found (train one: fit --config configs/dvae.yaml)")
    dvae = load_with_ema(DVAE, str(path), use_ema=use_ema)
    dvae.requires_grad_(False)
    downsample = 2 ** (dvae.hparams.group_count - 1)
    return dvae, DVAERecord(str(path), file_sha256(path), int(dvae.hparams.vocab_size), downsample)


def read_manifest(shard: str) -> dict[str, Any] | None:
    """The ``tokenize.json`` beside a shard, if any."""
    manifest = Path(shard).parent / MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else None


def _token_bytes(tokens: torch.Tensor, vocab_size: int) -> bytes:
    """A token grid as .npy bytes, in the smallest unsigned dtype that holds the codebook."""
    buf = io.BytesIO()
    np.save(buf, tokens.numpy().astype(np.uint16 if vocab_size <= 1 << 16 else np.int32))
    return buf.getvalue()


def _tokenize_shard(
    dvae: torch.nn.Module, record: DVAERecord, src: str, dst: Path, resolution: int, batch_size: int
) -> int:
    """Encode one shard into ``dst`` (written to a temporary name, then renamed); returns its sample count."""
    dataset = ShardDataset([src], CenterResize(resolution), batch_size, shuffle=False)
    tmp = dst.with_name(f".{dst.name}.tmp")
    count = 0
    device = next(dvae.parameters()).device
    with wds.TarWriter(str(tmp)) as sink:
        for batch in dataset:
            tokens = dvae.encode(batch["image"].to(device).float().div_(255)).cpu()  # [B, h, w]
            for key, caption, meta, grid in zip(batch["key"], batch["caption"], batch["meta"], tokens):
                sample = {"__key__": key, "txt": caption, TOKENS_MEMBER: _token_bytes(grid, record.vocab_size)}
                if meta is not None:
                    sample["json"] = meta
                sink.write(sample)
                count += 1
    os.replace(tmp, dst)
    return count


def tokenize(
    dvae: str,
    out: str,
    resolution: int,
    shards: str | list[str] | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    use_ema: bool = True,
) -> dict[str, Any]:
    """Encode image shards with a frozen DVAE into pre-tokenized shards for the Prior (resumable).

    Each input shard becomes one output shard of the same name (centre crop, resized to ``resolution``);
    shards already written are skipped, so an interrupted run resumes where it stopped.

    Args:
        dvae: the DVAE checkpoint.
        out: output folder; with no ``shards`` it gets train/, val/ and heldout/ subfolders.
        resolution: image side fed to the DVAE (tokens per side = resolution / downsampling).
        shards: input shard spec (paths, patterns, folders); None tokenizes the embedded dataset.
        batch_size: images per DVAE forward.
        device: where to run the DVAE ("cpu", "cuda", ...).
        use_ema: use the checkpoint's EMA weights when it has them.

    Returns:
        The manifest(s) written, by output folder.
    """
    model, record = load_frozen_dvae(dvae, use_ema=use_ema)
    model.to(device)
    if resolution % record.downsample:
        raise ValueError(f"--resolution {resolution} must be a multiple of the DVAE's downsampling {record.downsample}")
    if shards is None:
        from lit_dalle.data.embedded import EmbeddedShapes, ensure_embedded

        jobs = {
            Path(out) / split: str(folder)
            for split, folder in ensure_embedded(EmbeddedShapes(resolution=resolution)).items()
        }
    else:
        jobs = {Path(out): shards}
    manifests = {}
    for out_dir, spec in jobs.items():
        out_dir.mkdir(parents=True, exist_ok=True)
        sources = expand_shards(spec)
        counts = {}
        for src in tqdm(sources, desc=f"tokenize -> {out_dir}", unit="shard"):
            dst = out_dir / Path(src).name
            counts[dst.name] = (
                None if dst.is_file() else _tokenize_shard(model, record, src, dst, resolution, batch_size)
            )
        manifest = {"dvae": asdict(record), "resolution": resolution, "grid": resolution // record.downsample}
        (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
        manifests[str(out_dir)] = {**manifest, "written": {k: v for k, v in counts.items() if v is not None}}
        print(f"{out_dir}: {len(sources)} shards ({sum(v or 0 for v in counts.values())} samples encoded now)")
    return manifests
