"""The Prior's masks, cell by cell, against literal definitions written over (row, column) coordinates."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from lit_dalle.models.masks import (
    MASK_KINDS,
    block_density,
    build_mask,
    flex_block_mask,
    has_flex_attention,
    mask_density,
    register_mask_kind,
    resolve_schedule,
    stream_mask,
)


# ---------------------------------------------------------------- literal reference, written independently
def sees_image(kind: str, query: tuple[int, int], key: tuple[int, int], grid: int, kernel: int) -> bool:
    """Whether the image token at grid cell `query` may attend to the one at `key`, from the paper's pictures."""
    (r, c), (rk, ck) = query, key
    if (rk, ck) > (r, c):  # raster order: never a later token
        return False
    if kind == "full":
        return True
    if kind == "row":  # this row up to itself, and the previous row from the same column on (Fig. 11a)
        return (rk == r and ck <= c) or (rk == r - 1 and ck >= c)
    if kind == "column":  # same column, this or an earlier row (Fig. 11b)
        return ck == c
    if kind == "conv":  # the k x k window over the current and earlier rows, wrapping at the edges (Fig. 11d)
        half = kernel // 2
        for dr in range(half + 1):
            for dc in range(-half, half + 1):
                row, col = r - dr, c - dc
                if col < 0:  # off the left edge: the end of the row before
                    row, col = row - 1, col + grid
                elif col >= grid:  # off the right edge: the start of the next row
                    row, col = row + 1, col - grid
                if row >= 0 and (row, col) == (rk, ck):
                    return True
        return False
    raise AssertionError(kind)


def literal_mask(kind: str, text_len: int, grid: int, kernel: int) -> torch.Tensor:
    """The whole stream mask, one cell at a time, from the layout in the task (SOT, text, image tokens)."""
    slots = ["sot"] + [("text", p) for p in range(text_len)] + [("image", m) for m in range(grid * grid - 1)]
    size = len(slots)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for qi, q in enumerate(slots):
        for ki, k in enumerate(slots):
            q_text, k_text = q == "sot" or q[0] == "text", k == "sot" or k[0] == "text"
            if q_text:
                mask[qi, ki] = k_text and ki <= qi  # text: causal over text
            elif k_text:
                mask[qi, ki] = True  # an image query sees all of the text
            else:
                m, n = q[1], k[1]
                mask[qi, ki] = sees_image(kind, divmod(m, grid), divmod(n, grid), grid, kernel)
    return mask


CASES = [(3, 4, 3), (3, 5, 3), (3, 5, 5), (2, 6, 5)]  # (text_len, grid, conv kernel)


@pytest.mark.parametrize("kind", ["full", "row", "column", "conv"])
@pytest.mark.parametrize(("text_len", "grid", "kernel"), CASES)
def test_each_kind_cell_by_cell(kind: str, text_len: int, grid: int, kernel: int) -> None:
    expected = literal_mask(kind, text_len, grid, kernel)
    got = build_mask(kind, text_len, grid, kernel)
    assert got.shape == (text_len + grid * grid,) * 2
    assert torch.equal(got, expected), (got ^ expected).nonzero().tolist()


def test_row_mask_matches_the_papers_4x4_example() -> None:
    # Fig. 11a: each image token sees itself and the 4 before it; the last one is the same column, one row up.
    mask = build_mask("row", 0, 4)  # no text: position p holds image token p - 1 (position 0 is SOT)
    query = 1 + 9  # image token 9 = cell (2, 1)
    assert mask[query, 1:].nonzero().flatten().tolist() == [5, 6, 7, 8, 9]  # tokens 5 (cell (1, 1)) .. 9


def test_conv_mask_wraps_around() -> None:
    # 3x3 kernel on a 4x4 grid, query token 4 = cell (1, 0). Offsets d = m - n in {0, 1, 3, 4, 5}: itself (0),
    # its left neighbour wrapped to the previous row's end (1: token 3 = cell (0, 3)), up-right (3: token 1),
    # up (4: token 0); up-left (5) would be token -1, which does not exist.
    mask = build_mask("conv", 0, 4, kernel=3)  # no text: position p holds image token p - 1
    assert mask[1 + 4, 1:].nonzero().flatten().tolist() == [0, 1, 3, 4]


# ---------------------------------------------------------------------------------------------- schedule
def test_paper_schedule() -> None:
    kinds = resolve_schedule("paper", 64)
    assert kinds[:5] == ["row", "column", "row", "row", "row"]
    assert kinds[5] == "column" and kinds[-1] == "conv"
    assert Counter(kinds) == {"row": 47, "column": 16, "conv": 1}
    assert resolve_schedule("paper", 1) == ["conv"]


def test_schedules_by_name_and_list() -> None:
    assert resolve_schedule("full", 3) == ["full"] * 3
    assert resolve_schedule(("row", "conv"), 2) == ["row", "conv"]
    with pytest.raises(ValueError, match="one per layer"):
        resolve_schedule(["row"], 2)
    with pytest.raises(ValueError, match="unknown mask schedule"):
        resolve_schedule("diagonal", 2)
    with pytest.raises(ValueError, match="unknown kinds"):
        resolve_schedule(["row", "diagonal"], 2)


# --------------------------------------------------------------------------------------------- registry
def test_register_a_kind_and_reject_bad_masks() -> None:
    def two_rows(text_len: int, grid: int, kernel: int) -> torch.Tensor:
        return stream_mask(text_len, grid, lambda d: d <= 2 * grid)

    def peeks(text_len: int, grid: int, kernel: int) -> torch.Tensor:
        return torch.ones(text_len + grid * grid, text_len + grid * grid, dtype=torch.bool)

    try:
        register_mask_kind("test_two_rows", two_rows)
        register_mask_kind("test_peeks")(peeks)
        assert resolve_schedule("test_two_rows", 2) == ["test_two_rows"] * 2
        mask = build_mask("test_two_rows", 2, 3)
        assert mask[2 + 1 + 7, 3:].sum() == 7  # image token 7 (the last position) sees tokens 1 .. 7
        with pytest.raises(ValueError, match="already registered"):
            register_mask_kind("test_two_rows", two_rows)
        with pytest.raises(ValueError, match="causal"):
            build_mask("test_peeks", 2, 3)
    finally:
        MASK_KINDS.pop("test_two_rows", None)
        MASK_KINDS.pop("test_peeks", None)
    with pytest.raises(ValueError, match="unknown mask kind"):
        build_mask("test_two_rows", 2, 3)


# -------------------------------------------------------------------------------------------- densities
@pytest.mark.parametrize("kind", ["full", "row", "column", "conv"])
def test_densities_count_the_literal_mask(kind: str) -> None:
    expected = literal_mask(kind, 3, 5, 3)
    size = expected.shape[0]
    assert mask_density(kind, 3, 5, 3) == pytest.approx(expected.sum().item() / size**2)
    assert mask_density(kind, 3, 5, 3, of="causal") == pytest.approx(expected.sum().item() / (size * (size + 1) / 2))


def test_density_at_paper_size() -> None:
    assert mask_density("full", 256, 32, of="causal") == 1.0
    assert mask_density("row", 256, 32) < mask_density("conv", 256, 32) < mask_density("full", 256, 32)
    # Tiles of 128: row skips most of the image-image tiles; column (stride 32) skips none of them.
    assert block_density("row", 256, 32) < block_density("column", 256, 32) == block_density("full", 256, 32)


# -------------------------------------------------------------------------------------------- BlockMask
@pytest.mark.skipif(not has_flex_attention(), reason="FlexAttention needs torch >= 2.5")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_flex_block_mask_equals_dense(kind: str) -> None:
    from torch.nn.attention.flex_attention import flex_attention

    text_len, grid = 3, 5
    dense = build_mask(kind, text_len, grid, 3)
    block_mask = flex_block_mask(kind, text_len, grid, 3, block_size=8)  # T = 28: the last tile is partial
    q, k, v = torch.randn(3, 1, 2, dense.shape[0], 16).unbind(0)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=block_mask), expected)
    # A tile is skipped only where the dense mask hides all of it, and the row skips some.
    tiles = block_mask.to_dense()[0, 0].bool()  # [4, 4]
    padded = F.pad(dense, (0, 4, 0, 4)).view(4, 8, 4, 8).any(3).any(1)
    assert torch.equal(tiles, padded)
