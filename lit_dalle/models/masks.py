"""The Prior's attention masks (Ramesh et al. 2021, Sec. 2.2 and App. B.1, Fig. 11; PAPER.md B.4).

The stream. The full token stream is ``S = [SOT, text_0 .. text_{L-1}, image_0 .. image_{N-1}]`` with
``L = text_len`` and ``N = grid * grid``. The transformer reads ``S[:-1]``, ``T = L + N`` positions
(256 + 1024 = 1280 in the paper), and its output at position ``s`` predicts ``S[s + 1]``:

- position 0 holds SOT; positions ``1 .. L`` hold the text (the slot of text position ``p`` holds its
  caption token or that position's learned pad token, PAPER.md B.1); position ``L`` predicts ``image_0``;
- position ``L + 1 + m`` holds image token ``m`` (``m`` in ``0 .. N - 2``) and predicts image token ``m + 1``.

There is no separate start-of-image token: the last text slot plays that role (PAPER.md G.1, our choice).

The masks (``True`` = the query may attend to the key; a dense ``bool[T, T]``):

- text queries (positions ``0 .. L``) are causal over the text;
- every image query sees every text position, in every layer;
- image query ``m`` sees image key ``n <= m`` when the layer's kind allows the raster offset ``d = m - n``:

  ======== ======================================================================================
  row      ``d <= grid``: itself and the ``grid`` previous tokens, wrapping across rows (Sparse
           Transformer A(1) with stride ``grid``; the last key is the same column one row up)
  column   ``d % grid == 0``: the same column in this and every earlier row
  conv     ``d in {dr * grid + dc : 0 <= dr <= k // 2, |dc| <= k // 2}`` (kernel ``k``, odd, 11 in the
           paper): a causal k x k window whose raster-offset arithmetic wraps at the left and right
           edges like the row mask (PAPER.md B.4, "our reading")
  full     every ``n <= m``
  ======== ======================================================================================

Layer schedules (`resolve_schedule`): ``"paper"`` puts ``conv`` in the last layer and, for 1-based layer
``i`` in ``1 .. depth - 1``, ``column`` where ``(i - 2) % 4 == 0`` and ``row`` elsewhere (47 / 16 / 1 at
depth 64); any registered kind name means that kind in every layer; a list names one kind per layer.

Adding a mask kind: register a function ``fn(text_len: int, grid: int, kernel: int) -> Tensor`` that
returns the dense ``bool[T, T]`` mask. `stream_mask` lifts an image-to-image rule into the stream layout,
so a new kind usually only writes that rule::

    @register_mask_kind("two_rows")
    def two_rows(text_len: int, grid: int, kernel: int) -> torch.Tensor:
        return stream_mask(text_len, grid, lambda d: d <= 2 * grid)

Every mask is checked when built (`build_mask`): causal (no key after the query, which the KV cache relies
on) and with its diagonal set (no query without a key). `flex_block_mask` builds FlexAttention's
block-sparse ``BlockMask`` from the same dense mask, so the two attention paths cannot disagree.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # torch >= 2.5 has FlexAttention; it is imported only where it is used
    from torch.nn.attention.flex_attention import BlockMask

__all__ = [
    "MASK_KINDS",
    "SCHEDULES",
    "MaskFn",
    "block_density",
    "build_mask",
    "flex_block_mask",
    "has_flex_attention",
    "mask_density",
    "register_mask_kind",
    "resolve_schedule",
    "stream_length",
    "stream_mask",
]

MaskFn = Callable[[int, int, int], torch.Tensor]
"""``fn(text_len, grid, kernel) -> bool[T, T]`` with ``T = text_len + grid**2``; True = may attend."""

MASK_KINDS: dict[str, MaskFn] = {}
"""The registered mask kinds by name; add to it with `register_mask_kind` (which also clears the mask cache)."""


@functools.lru_cache(maxsize=32)  # defined before the registry: registering a kind clears it
def _build_mask_cached(kind: str, text_len: int, grid: int, kernel: int) -> torch.Tensor:
    mask = MASK_KINDS[kind](text_len, grid, kernel)
    size = stream_length(text_len, grid)
    if mask.dtype != torch.bool or tuple(mask.shape) != (size, size):
        raise ValueError(
            f"mask kind {kind!r} returned {mask.dtype} {tuple(mask.shape)}; expected bool ({size}, {size})"
        )
    if torch.triu(mask, diagonal=1).any():
        raise ValueError(f"mask kind {kind!r} lets a query attend to a later key; masks must be causal")
    if not mask.diagonal().all():
        raise ValueError(f"mask kind {kind!r} hides a position from itself; every query must see its own key")
    return mask


def stream_length(text_len: int, grid: int) -> int:
    """Number of positions the transformer reads: ``T = text_len + grid**2`` (the stream without its last token)."""
    return text_len + grid * grid


def register_mask_kind(
    name: str, fn: MaskFn | None = None, *, overwrite: bool = False
) -> MaskFn | Callable[[MaskFn], MaskFn]:
    """Register a mask kind under ``name``; usable as ``register_mask_kind(name, fn)`` or as a decorator.

    Args:
        name: The name layer schedules and configs use.
        fn: ``fn(text_len, grid, kernel) -> bool[T, T]``, True where a query (row) may attend to a key
            (column). See `stream_mask` for building one from an image-to-image rule.
        overwrite: Allow replacing an existing kind of the same name.

    Returns:
        ``fn`` (or, used as a decorator, a function that registers and returns it).
    """

    def add(f: MaskFn) -> MaskFn:
        if name in MASK_KINDS and not overwrite:
            raise ValueError(f"mask kind {name!r} is already registered; pass overwrite=True to replace it")
        MASK_KINDS[name] = f
        _build_mask_cached.cache_clear()
        return f

    return add if fn is None else add(fn)


# ------------------------------------------------------------------------------------------ the kinds
def stream_mask(text_len: int, grid: int, image_rule: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Lift an image-to-image rule into the stream layout described in the module docstring.

    Args:
        text_len: Text positions L (the stream has L + 1 text slots, SOT included).
        grid: Side of the image-token grid; N = grid**2.
        image_rule: Maps the raster offsets ``d = m - n >= 0`` (query image token m, key image token n;
            a LongTensor ``[N - 1, N - 1]``, entries with ``n > m`` already excluded) to a bool tensor.

    Returns:
        ``bool[T, T]``: text causal over text, image queries see all text and ``image_rule`` over image keys.
    """
    size = stream_length(text_len, grid)
    pos = torch.arange(size)
    query, key = pos[:, None], pos[None, :]  # [T, 1], [1, T]
    mask = (key <= query) & (key <= text_len)  # text keys, causal: [T, T]
    n_img = size - text_len - 1  # image query positions L + 1 .. T - 1 hold image tokens 0 .. N - 2
    d = torch.arange(n_img)[:, None] - torch.arange(n_img)[None, :]  # m - n: [N - 1, N - 1]
    mask[text_len + 1 :, text_len + 1 :] = (d >= 0) & image_rule(d.clamp(min=0))
    return mask


@register_mask_kind("full")
def full_mask(text_len: int, grid: int, kernel: int = 11) -> torch.Tensor:
    """Dense causal attention: image token m sees every image token n <= m."""
    return stream_mask(text_len, grid, lambda d: torch.ones_like(d, dtype=torch.bool))


@register_mask_kind("row")
def row_mask(text_len: int, grid: int, kernel: int = 11) -> torch.Tensor:
    """Row mask (Fig. 11a): itself and the previous ``grid`` image tokens, wrapping across rows."""
    return stream_mask(text_len, grid, lambda d: d <= grid)


@register_mask_kind("column")
def column_mask(text_len: int, grid: int, kernel: int = 11) -> torch.Tensor:
    """Column mask (Fig. 11b): the same column in this and every earlier row."""
    return stream_mask(text_len, grid, lambda d: d % grid == 0)


@register_mask_kind("conv")
def conv_mask(text_len: int, grid: int, kernel: int = 11) -> torch.Tensor:
    """Convolutional mask (Fig. 11d): offsets ``dr * grid + dc``, ``0 <= dr <= k//2``, ``|dc| <= k//2``."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"conv_kernel must be a positive odd number, got {kernel}")
    half = kernel // 2
    offsets = torch.zeros(grid * grid + 2 * half + 1, dtype=torch.bool)  # allowed offsets d >= 0
    for dr in range(half + 1):
        for dc in range(-half, half + 1):
            if 0 <= dr * grid + dc < len(offsets):
                offsets[dr * grid + dc] = True
    return stream_mask(text_len, grid, lambda d: offsets[d])


# ---------------------------------------------------------------------------------------- build, use
def build_mask(kind: str, text_len: int, grid: int, kernel: int = 11) -> torch.Tensor:
    """The dense mask of a registered kind, checked and cached (CPU; shared, so never modify it in place).

    Args:
        kind: A name in `MASK_KINDS`.
        text_len: Text positions L.
        grid: Side of the image-token grid.
        kernel: Kernel side of the ``conv`` kind (ignored by the others).

    Returns:
        ``bool[T, T]`` with ``T = text_len + grid**2``; True where the query (row) may attend to the key.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; registered kinds: {sorted(MASK_KINDS)}")
    return _build_mask_cached(kind, text_len, grid, kernel)


def _paper_schedule(depth: int) -> list[str]:
    # PAPER.md B.4: 1-based layer i < depth is column when (i - 2) % 4 == 0, else row; the last is conv.
    return ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, depth)] + ["conv"]


SCHEDULES: dict[str, Callable[[int], list[str]]] = {"paper": _paper_schedule}
"""Named layer schedules: ``name -> fn(depth) -> one kind per layer``. Kind names are schedules too."""


def resolve_schedule(schedule: str | Sequence[str], depth: int) -> list[str]:
    """One mask kind per layer from a schedule name (``"paper"``, or a kind name for every layer) or a list.

    Args:
        schedule: A name in `SCHEDULES`, a name in `MASK_KINDS`, or a sequence of ``depth`` kind names.
        depth: Number of layers.

    Returns:
        ``depth`` kind names, first layer first.
    """
    if isinstance(schedule, str):
        if schedule in SCHEDULES:
            kinds = SCHEDULES[schedule](depth)
        elif schedule in MASK_KINDS:
            kinds = [schedule] * depth
        else:
            raise ValueError(
                f"unknown mask schedule {schedule!r}; use one of {sorted(SCHEDULES)}, a mask kind "
                f"({sorted(MASK_KINDS)}) or a list of {depth} kind names"
            )
    else:
        kinds = list(schedule)
        if len(kinds) != depth:
            raise ValueError(f"mask schedule lists {len(kinds)} kinds for a depth of {depth}; give one per layer")
    unknown = sorted(set(kinds) - set(MASK_KINDS))
    if unknown:
        raise ValueError(f"mask schedule names unknown kinds {unknown}; registered kinds: {sorted(MASK_KINDS)}")
    return kinds


def mask_density(kind: str, text_len: int, grid: int, kernel: int = 11, *, of: str = "full") -> float:
    """Fraction of the attention matrix a kind computes.

    Args:
        kind: A registered mask kind.
        text_len: Text positions L.
        grid: Side of the image-token grid.
        kernel: Kernel side of the ``conv`` kind.
        of: ``"full"``: fraction of all ``T * T`` entries; ``"causal"``: of the ``T * (T + 1) / 2`` causal ones.

    Returns:
        The fraction in [0, 1].
    """
    mask = build_mask(kind, text_len, grid, kernel)
    size = mask.shape[0]
    total = {"full": size * size, "causal": size * (size + 1) // 2}
    if of not in total:
        raise ValueError(f"of must be 'full' or 'causal', got {of!r}")
    return int(mask.sum()) / total[of]


def block_density(kind: str, text_len: int, grid: int, kernel: int = 11, block_size: int = 128) -> float:
    """Fraction of ``block_size`` x ``block_size`` tiles with any visible entry: what a block-sparse kernel computes."""
    mask = build_mask(kind, text_len, grid, kernel)
    blocks = math.ceil(mask.shape[0] / block_size)
    pad = blocks * block_size - mask.shape[0]
    padded = torch.nn.functional.pad(mask, (0, pad, 0, pad))
    tiles = padded.view(blocks, block_size, blocks, block_size).any(dim=3).any(dim=1)  # [blocks, blocks]
    return int(tiles.sum()) / blocks**2


# -------------------------------------------------------------------------------------- FlexAttention
def has_flex_attention() -> bool:
    """Whether this torch has ``torch.nn.attention.flex_attention`` (torch >= 2.5)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_block_mask(
    kind: str,
    text_len: int,
    grid: int,
    kernel: int = 11,
    *,
    length: int | None = None,
    device: torch.device | str = "cpu",
    block_size: int = 128,
) -> BlockMask:
    """FlexAttention's block-sparse mask for a kind, indexing the same dense mask `build_mask` returns.

    Args:
        kind: A registered mask kind.
        text_len: Text positions L.
        grid: Side of the image-token grid.
        kernel: Kernel side of the ``conv`` kind.
        length: Query and key length (a prefix of the stream); None means the whole ``T``.
        device: Where the mask lives (the device of the attention inputs).
        block_size: Tile side of the block-sparse layout.

    Returns:
        A ``BlockMask`` for ``flex_attention`` over ``length`` queries and keys, any batch and head.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    dense = build_mask(kind, text_len, grid, kernel)
    length = dense.shape[0] if length is None else length
    dense = dense[:length, :length].to(device)
    last = length - 1

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        # Clamp, then mask: the tiles past `length` (padding to a whole block) must not index out of range.
        inside = (q_idx <= last) & (kv_idx <= last)
        return inside & dense[q_idx.clamp(max=last), kv_idx.clamp(max=last)]

    return create_block_mask(mask_mod, None, None, length, length, device=device, BLOCK_SIZE=block_size)
