"""Masked multi-head self-attention for the Prior, its KV cache, and the choice of attention kernel.

One attention op with a single softmax over text and image keys (PAPER.md B.4, fn. 7), masked by the
layer's mask kind (`lit_dalle.models.masks`). Two kernels compute it, tested equal (forward on CPU;
forward and backward on CUDA in a ``gpu``-marked test):

- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` with the dense boolean mask. Runs
  everywhere, with a backward everywhere; the only choice on CPU for training.
- ``"flex"``: FlexAttention (torch >= 2.5) with a block-sparse ``BlockMask`` built from the same dense
  mask, compiled with ``torch.compile`` on CUDA. It skips the tiles a mask hides entirely. FlexAttention
  has no backward on CPU (STACK.md), so ``"auto"`` picks it on CUDA only.

Cached (incremental) calls always use SDPA with the rows of the dense mask that belong to the new
queries, which serves every mask kind: a query's row says exactly which cached keys it may see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lit_dalle.models.masks import has_flex_attention

__all__ = ["AttentionBackend", "KVCache", "SelfAttention", "pick_backend"]

AttentionBackend = Literal["auto", "sdpa", "flex"]

_compiled_flex = None  # torch.compile(flex_attention), built on first CUDA use


def pick_backend(backend: AttentionBackend, device: torch.device) -> Literal["sdpa", "flex"]:
    """Resolve ``"auto"`` (FlexAttention on CUDA, SDPA elsewhere) and check that the choice can run here."""
    if backend == "auto":
        return "flex" if device.type == "cuda" and has_flex_attention() else "sdpa"
    if backend == "flex" and not has_flex_attention():
        raise ValueError(f"attention_backend='flex' needs torch >= 2.5 (this is {torch.__version__}); use 'sdpa'")
    if backend not in ("sdpa", "flex"):
        raise ValueError(f"attention_backend must be 'auto', 'sdpa' or 'flex', got {backend!r}")
    return backend


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: object) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type != "cuda":  # eager: materialises the scores; fine for CPU tests, forward only
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise RuntimeError(
                "attention_backend='flex' has no backward on CPU (FlexAttention's limit); use 'sdpa' or 'auto' here"
            )
        return flex_attention(q, k, v, block_mask=block_mask)
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


@dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding; `length` positions are filled.

    Each layer's buffers are allocated on its first write, ``[batch, heads, max_len, head_dim]``, in the
    dtype and device of the keys being written (so they follow autocast and the model's device).
    """

    max_len: int
    """Capacity in positions (the model's stream length T)."""
    keys: list[torch.Tensor | None] = field(default_factory=list)
    """Per layer: ``[B, H, max_len, head_dim]`` or None before the first write."""
    values: list[torch.Tensor | None] = field(default_factory=list)
    """Per layer: like `keys`."""
    length: int = 0
    """Positions written so far; the next call starts at this stream position."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` (``[B, H, t, hd]``) at positions ``start .. start + t - 1``; return keys and values so far."""
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; a write up to {end} does not fit")
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        cached_k, cached_v = self.keys[layer], self.values[layer]
        cached_k[:, :, start:end] = k
        cached_v[:, :, start:end] = v
        return cached_k[:, :, :end], cached_v[:, :, :end]  # [B, H, end, hd]


class SelfAttention(nn.Module):
    """The attention resblock's residual branch: LayerNorm, QKV projection, masked attention, output projection.

    ``proj`` is the residual-output projection (its init is scaled down by depth, see `Transformer`).
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: object,
        *,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
    ) -> torch.Tensor:
        """Attend from the positions of ``x`` to themselves and to the cached positions before them.

        Args:
            x: ``[B, t, D]``, stream positions ``start .. start + t - 1``.
            mask: Dense ``bool[t, start + t]`` (SDPA), a FlexAttention ``BlockMask`` over ``t`` (no cache), or
                for one cached step (``t == 1``) a LongTensor of the key positions to attend to.
            cache: Where to write this call's keys and values and read the earlier ones; None for a full pass.
            layer: This layer's index in the cache.
            start: Stream position of the first row of ``x``.

        Returns:
            The branch output ``[B, t, D]`` (before the residual add).
        """
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).split(d, dim=2)  # 3 x [B, t, D]
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))  # [B, H, t, hd]
        if cache is not None:
            k, v = cache.update(layer, k, v, start)  # [B, H, start + t, hd]
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.long:  # visible key positions (decode step)
            k, v = k.index_select(2, mask), v.index_select(2, mask)  # [B, H, n, hd]
            y = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, hd]
        elif isinstance(mask, torch.Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, t, hd]
        else:
            y = _flex(q, k, v, mask)  # [B, H, t, hd]
        y = y.transpose(1, 2).reshape(b, t, d)  # [B, t, D]
        return self.dropout(self.proj(y))
