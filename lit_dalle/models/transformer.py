"""The Prior's network: a decoder-only sparse transformer over [text][image] tokens (PAPER.md B.1-B.4, C.4).

Stream layout (see `lit_dalle.models.masks` for the masks over it). The full stream is
``S = [SOT, text_0 .. text_{L-1}, image_0 .. image_{N-1}]`` (``L = text_len``, ``N = grid**2``); the
model reads ``S[:-1]``, ``T = L + N`` positions, and position ``s`` predicts ``S[s + 1]``:

======================  ======================  ============================================
stream position         holds                   its output predicts (head)
======================  ======================  ============================================
0                       SOT                     text_0 (text head)
1 .. L - 1              text_0 .. text_{L-2}    text_1 .. text_{L-1} (text head)
L                       text_{L-1}              image_0 (image head)
L + 1 + m               image_m                 image_{m+1}, m = 0 .. N - 2 (image head)
======================  ======================  ============================================

So `Transformer.forward` returns ``text_logits[:, p]`` for text token ``p`` (aligned with ``text``) and
``image_logits[:, m]`` for image token ``m`` (aligned with ``image``). There is no separate start-of-image
token: the last text slot plays that role (PAPER.md G.1, our choice). Text slots past the caption hold
``TEXT_PAD``, embedded as one learned pad token per text position (PAPER.md B.1). ``TEXT_PAD`` equals
cross-entropy's default ``ignore_index``, so the padded ``text`` is also the text target: the text loss
skips pad positions (PAPER.md G.1 leaves this open; our choice).

Embeddings (B.2): text ``token (or that position's pad, or SOT) + text position``; image
``token + row + column``. Each layer (B.3) is two pre-norm resblocks, ``blocks.<i>.attn`` and
``blocks.<i>.mlp``, each ``x + post_gain * res_path(x)`` with the residual branch (``res_path``: LayerNorm,
sublayer, output projection, dropout) a submodule of its own, so a precision plugin can wrap each of the
``2 * depth`` resblocks by name (PAPER.md C: 128 resblocks at depth 64). A final LayerNorm, then two
unembeddings computed in fp32 even under autocast (C.4): ``text_head`` and ``image_head``. The residual
stream stays fp32 under autocast (embeddings are fp32 and each branch output is added to it).

Init (not given by the paper, B.3; our choice, GPT-2 style): every Linear and Embedding ~ N(0, 0.02) with
zero biases, the residual-output projections (``res_path.proj``) ~ N(0, 0.02 / sqrt(2 * depth)), LayerNorm
gain 1 and bias 0. No dropout in the paper; ``dropout`` applies to the embeddings and each branch output
(never to attention probabilities, so the SDPA and FlexAttention kernels stay identical).

Generation: `Transformer.new_cache`, `Transformer.prefill` (caption plus an optional image prefix, e.g. the
first R rows, PAPER.md E.1, in one call), `Transformer.decode_step` (one image token per call; every mask
kind, since a query's row of the layer's mask selects its cached keys) and `Transformer.generate_image_tokens`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lit_dalle.models.attention import AttentionBackend, KVCache, SelfAttention, pick_backend
from lit_dalle.models.masks import build_mask, flex_block_mask, resolve_schedule, stream_length

__all__ = ["MLP", "TEXT_PAD", "Embeddings", "Layer", "ResBlock", "Transformer", "TransformerConfig", "sample_logits"]

TEXT_PAD = -100
"""Marks a text slot with no caption token (embedded as that position's pad token; ignored by the text loss)."""


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes and choices of the Prior's transformer (defaults: the paper's 12 B model, PAPER.md B.1-B.4)."""

    text_vocab: int = 16384
    """BPE vocabulary size (text head outputs; text ids are 0 .. text_vocab - 1)."""
    image_vocab: int = 8192
    """dVAE codebook size (image head outputs)."""
    text_len: int = 256
    """Text positions L (captions are padded or cut to this many tokens)."""
    grid: int = 32
    """Side of the image-token grid; N = grid**2 image tokens."""
    depth: int = 64
    """Number of layers (each an attention and an MLP resblock)."""
    width: int = 3968
    """Model width d_model."""
    heads: int = 62
    """Attention heads (head size width / heads)."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLP as a multiple of width."""
    dropout: float = 0.0
    """Dropout on the embeddings and on each residual branch's output (the paper uses none)."""
    mask_schedule: str | tuple[str, ...] = "paper"
    """Mask kind per layer: "paper", a kind name for every layer ("row", "column", "conv", "full"), or a list."""
    conv_kernel: int = 11
    """Kernel side of the "conv" mask (odd)."""
    attention_backend: AttentionBackend = "auto"
    """"sdpa" (dense mask), "flex" (block-sparse FlexAttention; no backward on CPU) or "auto" (flex on CUDA)."""

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a multiple of heads ({self.heads})")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be a positive odd number, got {self.conv_kernel}")
        if min(self.text_vocab, self.image_vocab, self.text_len, self.grid, self.depth) < 1:
            raise ValueError("text_vocab, image_vocab, text_len, grid and depth must all be >= 1")
        resolve_schedule(self.mask_schedule, self.depth)  # an unknown kind or a wrong length fails here

    @property
    def seq_len(self) -> int:
        """Positions the model reads: T = text_len + grid**2."""
        return stream_length(self.text_len, self.grid)


# --------------------------------------------------------------------------------------------- blocks
class Embeddings(nn.Module):
    """Token and position embeddings of a stretch of the stream (PAPER.md B.1, B.2)."""

    def __init__(self, text_vocab: int, text_len: int, image_vocab: int, grid: int, width: int) -> None:
        super().__init__()
        self.text_vocab, self.text_len, self.grid = text_vocab, text_len, grid
        self.text = nn.Embedding(text_vocab + text_len + 1, width)  # BPE ids, one pad per position, SOT
        self.text_pos = nn.Embedding(text_len + 1, width)  # stream positions 0 .. L
        self.image = nn.Embedding(image_vocab, width)
        self.row = nn.Embedding(grid, width)
        self.column = nn.Embedding(grid, width)

    def forward(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Embed ``tokens`` ``[B, t]`` at stream positions ``start .. start + t - 1`` -> ``[B, t, D]``.

        Each entry is read in its position's vocabulary: position 0 is SOT (its value is ignored),
        positions 1 .. L a text id or `TEXT_PAD`, later positions an image id.
        """
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)  # [t]
        n_text = max(0, min(self.text_len + 1 - start, tokens.shape[1]))
        parts = []
        if n_text:
            p, ids = pos[:n_text], tokens[:, :n_text]  # [t_text], [B, t_text]
            ids = torch.where(ids == TEXT_PAD, self.text_vocab + p - 1, ids)  # slot p holds text position p - 1
            ids = torch.where(p == 0, self.text_vocab + self.text_len, ids)  # SOT
            parts.append(self.text(ids) + self.text_pos(p))  # [B, t_text, D]
        if n_text < tokens.shape[1]:
            m = pos[n_text:] - self.text_len - 1  # image token index: [t_image]
            parts.append(self.image(tokens[:, n_text:]) + self.row(m // self.grid) + self.column(m % self.grid))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # [B, t, D]


class MLP(nn.Module):
    """The MLP resblock's residual branch: LayerNorm, width -> ratio * width, GELU, back to width."""

    def __init__(self, width: int, ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = round(ratio * width)
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, t, D] -> [B, t, D]``."""
        return self.dropout(self.proj(self.act(self.fc(self.norm(x)))))


class ResBlock(nn.Module):
    """``x + post_gain * res_path(x, ...)``: the unit that per-resblock gradient scaling wraps (PAPER.md C.2).

    ``res_path`` is the whole residual branch (its own pre-norm included); hook or replace it by name to
    act on the branch alone. ``post_gain`` is a plain float (1 by default; the init already scales the
    branch), the place to put a fixed branch gain.
    """

    def __init__(self, res_path: nn.Module, post_gain: float = 1.0) -> None:
        super().__init__()
        self.res_path = res_path
        self.post_gain = post_gain

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        """``[B, t, D] -> [B, t, D]``; extra arguments go to ``res_path``."""
        out = self.res_path(x, *args, **kwargs)
        return x + (out if self.post_gain == 1.0 else self.post_gain * out)


class Layer(nn.Module):
    """One transformer layer: an attention resblock ``attn`` then an MLP resblock ``mlp``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float, mask_kind: str) -> None:
        super().__init__()
        self.mask_kind = mask_kind
        self.attn = ResBlock(SelfAttention(width, heads, dropout))
        self.mlp = ResBlock(MLP(width, mlp_ratio, dropout))

    def forward(
        self, x: torch.Tensor, mask: object, *, cache: KVCache | None = None, layer: int = 0, start: int = 0
    ) -> torch.Tensor:
        """``[B, t, D] -> [B, t, D]``; see `SelfAttention.forward` for the other arguments."""
        return self.mlp(self.attn(x, mask, cache=cache, layer=layer, start=start))


# ---------------------------------------------------------------------------------------------- model
class Transformer(nn.Module):
    """The decoder-only transformer over the text-image stream described in the module docstring."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.mask_kinds = resolve_schedule(config.mask_schedule, config.depth)
        c = config
        self.embed = Embeddings(c.text_vocab, c.text_len, c.image_vocab, c.grid, c.width)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Layer(c.width, c.heads, c.mlp_ratio, c.dropout, k) for k in self.mask_kinds)
        self.final_norm = nn.LayerNorm(c.width)
        self.text_head = nn.Linear(c.width, c.text_vocab, bias=False)
        self.image_head = nn.Linear(c.width, c.image_vocab, bias=False)
        self._masks: dict[tuple, object] = {}  # (kind, device[, length]) -> dense mask or BlockMask; not state
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2-style init (module docstring): N(0, 0.02), residual-output projections / sqrt(2 * depth)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        for block in self.blocks:
            for branch in (block.attn.res_path, block.mlp.res_path):
                nn.init.normal_(branch.proj.weight, std=0.02 / math.sqrt(2 * self.config.depth))

    def no_decay_parameter_names(self) -> set[str]:
        """Names of the gains, biases and embeddings: no weight decay on them (PAPER.md B.6)."""
        names = set()
        for module_name, module in self.named_modules():
            for name, _ in module.named_parameters(recurse=False):
                if isinstance(module, (nn.LayerNorm, nn.Embedding)) or name == "bias":
                    names.add(f"{module_name}.{name}" if module_name else name)
        return names

    # ------------------------------------------------------------------------------------ the stream
    def stream(self, text: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """The model's input tokens ``[SOT, text, image[:, :N-1]]``: ``[B, L + 1 + min(n, N - 1)]``."""
        c = self.config
        if text.dim() != 2 or text.shape[1] != c.text_len:
            raise ValueError(f"text must be [batch, text_len={c.text_len}], got {tuple(text.shape)}")
        n = 0 if image is None else image.shape[1]
        if image is not None and (image.dim() != 2 or image.shape[0] != text.shape[0] or n > c.grid**2):
            raise ValueError(f"image must be [batch={text.shape[0]}, n <= {c.grid**2}], got {tuple(image.shape)}")
        if not torch.compiler.is_compiling():  # a bad id would silently hit a pad embedding or fail on device
            bad = (text != TEXT_PAD) & ((text < 0) | (text >= c.text_vocab))
            if bad.any():
                raise ValueError(f"text ids must be in [0, {c.text_vocab}) or TEXT_PAD ({TEXT_PAD})")
            if n and ((image < 0) | (image >= c.image_vocab)).any():
                raise ValueError(f"image ids must be in [0, {c.image_vocab})")
        parts = [text.new_zeros(text.shape[0], 1), text]  # the SOT slot's value is ignored
        if n:
            parts.append(image[:, : c.grid**2 - 1])
        return torch.cat(parts, dim=1)

    def _attention_masks(self, start: int, length: int, device: torch.device, cached: bool) -> dict[str, object]:
        """Per kind: the dense rows ``[start:start+length, :start+length]`` (SDPA) or a BlockMask (flex).

        For a single cached decode step, a kind that hides some keys gets the LongTensor of the key
        positions it can see instead: attention then gathers those keys only (row and conv layers read a
        window, column layers a stride, rather than the whole cache).
        """
        c = self.config
        flex = not cached and start == 0 and pick_backend(c.attention_backend, device) == "flex"
        masks = {}
        for kind in set(self.mask_kinds):
            if cached and length == 1:  # one decode step: hand attention only the keys this kind can see
                key = (kind, device, "keys", start)
                if key not in self._masks:
                    row = build_mask(kind, c.text_len, c.grid, c.conv_kernel)[start, : start + 1]  # CPU, cached
                    keep = row.nonzero().squeeze(1)  # [n] key positions
                    self._masks[key] = keep.to(device) if keep.numel() <= start else row.to(device)[None]
                masks[kind] = self._masks[key]
                continue
            key = (kind, device, length) if flex else (kind, device)
            if key not in self._masks:
                if flex:
                    self._masks[key] = flex_block_mask(
                        kind, c.text_len, c.grid, c.conv_kernel, length=length, device=device
                    )
                else:
                    self._masks[key] = build_mask(kind, c.text_len, c.grid, c.conv_kernel).to(device)
            mask = self._masks[key]
            masks[kind] = mask if flex else mask[start : start + length, : start + length]
        return masks

    def forward_stream(self, tokens: torch.Tensor, *, cache: KVCache | None = None) -> torch.Tensor:
        """Run the layers over stream tokens (read as in `Embeddings.forward`) -> final-norm hidden ``[B, t, D]``.

        Without a cache the tokens are positions ``0 .. t - 1``; with one they continue at ``cache.length``
        (their keys and values are appended, and ``cache.length`` grows by ``t``).
        """
        start = cache.length if cache is not None else 0
        if start + tokens.shape[1] > self.config.seq_len:
            raise ValueError(f"positions {start} .. {start + tokens.shape[1] - 1} pass T = {self.config.seq_len}")
        masks = self._attention_masks(start, tokens.shape[1], tokens.device, cached=cache is not None)
        x = self.drop(self.embed(tokens, start))  # [B, t, D], fp32
        for i, block in enumerate(self.blocks):
            x = block(x, masks[block.mask_kind], cache=cache, layer=i, start=start)  # [B, t, D]
        if cache is not None:
            cache.length = start + tokens.shape[1]
        return self.final_norm(x)

    def _fp32_head(self, head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # PAPER.md C.4: logits in fp32
            return F.linear(hidden.float(), head.weight.float())

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 text-head logits ``[..., text_vocab]`` of hidden states ``[..., D]``."""
        return self._fp32_head(self.text_head, hidden)

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 image-head logits ``[..., image_vocab]`` of hidden states ``[..., D]``."""
        return self._fp32_head(self.image_head, hidden)

    def forward(
        self, text: torch.Tensor, image: torch.Tensor | None = None, *, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits for every text token and for every image token up to one past the given ones.

        Args:
            text: ``[B, L]`` text ids, `TEXT_PAD` past the caption.
            image: ``[B, n]`` image ids, ``0 <= n <= N`` (None: no image tokens).
            cache: An empty `KVCache` to fill (prefill), or None.

        Returns:
            ``text_logits [B, L, text_vocab]`` (entry p predicts ``text[:, p]``) and ``image_logits
            [B, min(n + 1, N), image_vocab]`` (entry m predicts ``image[:, m]``), both fp32. Training
            passes ``n = N``; targets are ``text`` and ``image`` themselves.
        """
        if cache is not None and cache.length:
            raise ValueError("forward starts at position 0: pass an empty cache (Transformer.new_cache())")
        hidden = self.forward_stream(self.stream(text, image), cache=cache)  # [B, L + 1 + n', D]
        L = self.config.text_len
        return self.text_logits(hidden[:, :L]), self.image_logits(hidden[:, L:])

    # ------------------------------------------------------------------------------------- generation
    def new_cache(self) -> KVCache:
        """An empty KV cache for `prefill` and `decode_step` (buffers are allocated on first use)."""
        return KVCache(max_len=self.config.seq_len)

    def prefill(self, text: torch.Tensor, image_prefix: torch.Tensor | None = None, *, cache: KVCache) -> torch.Tensor:
        """Run the caption and an optional image prefix ``[B, n < N]`` in one call, filling an empty ``cache``.

        Returns:
            fp32 logits ``[B, image_vocab]`` of the next image token (index ``n``).
        """
        if image_prefix is not None and image_prefix.shape[1] >= self.config.grid**2:
            raise ValueError(f"image_prefix must hold fewer than N = {self.config.grid**2} tokens")
        if cache.length:
            raise ValueError("prefill needs an empty cache (Transformer.new_cache())")
        hidden = self.forward_stream(self.stream(text, image_prefix), cache=cache)  # [B, t, D]
        return self.image_logits(hidden[:, -1])

    def decode_step(self, image_token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append image token ``m = cache.length - L - 1`` (``[B]``); fp32 logits ``[B, image_vocab]`` of m + 1."""
        c = self.config
        if not c.text_len + 1 <= cache.length < c.seq_len:
            raise ValueError(
                f"decode_step continues a prefilled cache below T = {c.seq_len}; its length is {cache.length}"
            )
        hidden = self.forward_stream(image_token.view(-1, 1), cache=cache)  # [B, 1, D]
        return self.image_logits(hidden[:, 0])

    @torch.no_grad()
    def generate_image_tokens(
        self,
        text: torch.Tensor,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        image_prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample the image tokens of each caption with the KV cache (PAPER.md E.1: temperature 1, no top-k/p).

        Args:
            text: ``[B, L]`` text ids (`TEXT_PAD` past the caption); repeat a caption for several samples.
            temperature: Softmax temperature; 0 picks the most likely token.
            top_k: Keep only the k most likely tokens at each step.
            top_p: Keep the smallest set of most likely tokens whose probability reaches p.
            generator: Random generator (on the model's device) for reproducible samples.
            image_prefix: ``[B, n]`` known first tokens (e.g. the first R rows, ``n = R * grid``) to complete.

        Returns:
            ``[B, N]`` image ids, the prefix included. Runs in eval mode (dropout off), then restores the mode.
        """
        n_image = self.config.grid**2
        n = 0 if image_prefix is None else image_prefix.shape[1]
        out = text.new_empty(text.shape[0], n_image)
        if n:
            out[:, :n] = image_prefix
        if n >= n_image:
            return out
        was_training = self.training
        self.eval()
        try:
            cache = self.new_cache()
            logits = self.prefill(text, image_prefix, cache=cache)  # [B, V]
            for m in range(n, n_image):
                out[:, m] = sample_logits(logits, temperature, top_k, top_p, generator)
                if m + 1 < n_image:
                    logits = self.decode_step(out[:, m], cache)
        finally:
            self.train(was_training)
        return out


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row of ``logits`` ``[B, V]`` -> ``[B]`` (temperature, then top-k, then top-p)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(dim=-1)  # [B, V]
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # the mass before a token already reaches p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
