"""Turning raw shard members into (image, caption) samples, and counting the ones we skip.

Bad samples never stop training (DESIGN.md, Data): each one is skipped, counted under a reason, and
warned about at a limited rate. The counts travel with every batch (see ``dataset.py``) so the main
process can log them as metrics, summed over workers and ranks.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from lit_dalle.data.shards import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "undecodable_image",
    "missing_image",
    "missing_caption",
    "empty_caption",
    "non_utf8_caption",
    "aspect_ratio",
    "truncated_shard",
)
"""Every reason a sample (or the rest of a shard) can be skipped for; each becomes a logged metric."""


TOKENS_MEMBER = "tokens.npy"
"""Pre-tokenized shards (``python -m lit_dalle tokenize``) hold ``KEY.tokens.npy`` in place of an image."""


@dataclass
class Sample:
    """One decoded sample."""

    key: str
    """The sample's key (file name without extension inside the shard)."""
    image: torch.Tensor | None
    """uint8 [3, H, W] RGB; None for a pre-tokenized sample."""
    caption: str
    """The normalised caption."""
    meta: dict[str, Any] | None
    """The parsed ``KEY.json`` member, when present and valid."""
    tokens: torch.Tensor | None = None
    """Image tokens LongTensor [h, w] of a pre-tokenized sample, else None."""


class SkipCounter:
    """Counts skipped samples per reason and warns at a limited rate.

    Args:
        warn_every_s: at most one warning per reason within this many seconds (the first is immediate).
        sink: optional int64 [len(SKIP_REASONS)] tensor (a row of shared memory) that each skip adds to,
            so that a loader worker's counts reach the main process.
    """

    def __init__(self, warn_every_s: float = 60.0, sink: torch.Tensor | None = None) -> None:
        self.counts: Counter[str] = Counter()
        self._last_warned: dict[str, float] = {}
        self.warn_every_s = warn_every_s
        self.sink = sink

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        """Record one skipped sample (or shard) and maybe warn."""
        assert reason in SKIP_REASONS, reason
        self.counts[reason] += 1
        if self.sink is not None:
            self.sink[SKIP_REASONS.index(reason)] += 1
        now = time.monotonic()
        if now - self._last_warned.get(reason, -float("inf")) >= self.warn_every_s:
            self._last_warned[reason] = now
            log.warning(
                "skipped %s: %s%s (%d skipped for this reason so far in this worker; "
                "warnings for it are limited to one per %.0f s)",
                reason, where, f" ({detail})" if detail else "", self.counts[reason], self.warn_every_s,
            )  # fmt: skip


_SPACES = re.compile(r"\s+")


def normalize_caption(text: str) -> str:
    """Lowercase the caption (PAPER.md B.1) and collapse runs of whitespace."""
    return _SPACES.sub(" ", text).strip().lower()


def decode_caption(raw: bytes | str) -> str:
    """Decode a caption member as strict UTF-8 (raises ``UnicodeDecodeError`` otherwise)."""
    return raw if isinstance(raw, str) else raw.decode("utf-8")


def decode_raw_image(data: bytes, min_side: int | None = None) -> torch.Tensor:
    """Decode JPEG / PNG / WebP bytes into uint8 [3, H, W] RGB (raises ``ValueError`` on bad data).

    Pillow, not ``torchvision.io``: torchvision 0.29 deprecates its decoders (for torchcodec), and Pillow
    raises on truncated files instead of returning a partly grey image.

    Args:
        data: the encoded image.
        min_side: when given, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (DCT scaling, much faster)
            as long as both sides stay >= ``min_side``: the augmentation shrinks it further anyway.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if min_side is not None and image.format == "JPEG":
                image.draft("RGB", (min_side, min_side))
            array = np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # Pillow's errors for bad files
        raise ValueError(f"cannot decode image: {err}") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def decode_sample(
    raw: dict[str, Any],
    skips: SkipCounter,
    *,
    min_aspect_ratio: float = 0.5,
    max_aspect_ratio: float = 2.0,
    min_side: int | None = None,
    normalize: Callable[[str], str] = normalize_caption,
) -> Sample | None:
    """Decode one raw WebDataset sample, or count why it was skipped and return None.

    Args:
        raw: ``{"__key__", "__url__", "<ext>": bytes, ...}`` as ``tarfile_to_samples`` yields it.
        skips: where skipped samples are counted.
        min_aspect_ratio: smallest accepted width / height (the paper filters outside [1/2, 2], F).
        max_aspect_ratio: largest accepted width / height.
        min_side: the smallest image side the augmentation needs (lets large JPEGs decode faster).
        normalize: turns the decoded caption into the training caption.
    """
    key = raw.get("__key__", "?")
    where = f"{raw.get('__url__', '?')}:{key}"
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_ext is None and TOKENS_MEMBER not in raw:
        skips.skip("missing_image", where)
        return None
    if "txt" not in raw:
        skips.skip("missing_caption", where)
        return None
    try:
        caption = normalize(decode_caption(raw["txt"]))
    except UnicodeDecodeError as err:
        skips.skip("non_utf8_caption", where, str(err))
        return None
    if not caption:
        skips.skip("empty_caption", where)
        return None
    meta = _parse_meta(raw.get("json"))
    if image_ext is None:
        try:
            tokens = torch.from_numpy(np.load(io.BytesIO(raw[TOKENS_MEMBER])).astype(np.int64))
        except ValueError as err:
            skips.skip("undecodable_image", where, f"bad {TOKENS_MEMBER}: {err}")
            return None
        return Sample(key=key, image=None, caption=caption, meta=meta, tokens=tokens)
    try:
        image = decode_raw_image(raw[image_ext], min_side)
    except ValueError as err:
        skips.skip("undecodable_image", where, str(err).splitlines()[-1][:120])
        return None
    height, width = image.shape[-2:]
    if not min_aspect_ratio <= width / height <= max_aspect_ratio:
        skips.skip("aspect_ratio", where, f"{width}x{height}")
        return None
    return Sample(key=key, image=image, caption=caption, meta=meta)


def _parse_meta(raw: bytes | None) -> dict[str, Any] | None:
    """Parse the optional ``KEY.json`` member; metadata is optional, so a bad one is just dropped."""
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None
