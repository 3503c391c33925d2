"""The discrete VAE's networks (Ramesh et al. 2021, Sec. 2.1 and App. A.1; PAPER.md A.2).

Layer for layer the layout of the released OpenAI dVAE (`openai/DALL-E`, `dall_e/encoder.py` and
`dall_e/decoder.py`), so that its released weights load by copying tensors:

- convolutions with "same" padding, weight ~ N(0, 1 / sqrt(n_in * k**2)) and zero bias (`init_conv`);
- bottleneck resblocks `out = id_path(x) + post_gain * res_path(x)` with `post_gain = 1 / n_layers**2`
  (`n_layers = group_count * n_blk_per_group`), a 1x1 `id_path` only where the width changes, no
  normalisation, ReLU before every conv (`EncoderBlock`, `DecoderBlock`);
- the encoder: a 7x7 `input` conv, `group_count` groups of blocks at widths n_hid * (1, 2, 4, 8, ...)
  with a 2x max-pool between groups, and an `output` ReLU + 1x1 conv to the codebook logits (`Encoder`);
- the decoder: an `input` 1x1 conv from the (soft) one-hot codes to `n_init` channels, groups at widths
  n_hid * (..., 8, 4, 2, 1) with 2x nearest upsampling between groups, and an `output` ReLU + 1x1 conv to
  2 * channels outputs: the logit-Laplace location (mu) then log-scale (ln b) of each channel (`Decoder`).

Module names are stable and addressable (`group_1.block_2.res_path.conv_3`, STYLE.md 3): per-resblock
gradient scaling, sharding and EMA select modules by them. The conv at the encoder output and the one at
the decoder input run in fp32 even under autocast, as the released code keeps them (`use_float16=False`).
"""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = [
    "PRESETS",
    "DVAEConfig",
    "Decoder",
    "DecoderBlock",
    "Encoder",
    "EncoderBlock",
    "Fp32Conv2d",
    "init_conv",
]


# --------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DVAEConfig:
    """Sizes of the encoder and decoder (defaults: the paper's model, PAPER.md A.2)."""

    vocab_size: int = 8192
    """Codebook size K (encoder logits per position, decoder input channels)."""
    n_hid: int = 256
    """Width of the first encoder group and of the last decoder group; group i is n_hid * 2**(i-1)."""
    group_count: int = 4
    """Number of groups; the spatial downsampling factor is 2**(group_count - 1)."""
    n_blk_per_group: int = 2
    """Resblocks per group."""
    n_init: int = 128
    """Channels of the decoder's input 1x1 conv (a codebook embedding of this width)."""
    channels: int = 3
    """Image channels; the decoder outputs 2 * channels (mu, ln b)."""
    n_layers: int | None = None
    """Depth used for post_gain = 1 / n_layers**2; None means group_count * n_blk_per_group."""

    def as_dict(self) -> dict[str, int | None]:
        """The fields as a plain dict (for `DVAE(**config.as_dict())`)."""
        return asdict(self)


PRESETS: dict[str, DVAEConfig] = {
    # PAPER.md A.2: 256 px -> 32x32 tokens of 8192 codes; encoder 53.8 M, decoder 43.8 M parameters.
    "paper": DVAEConfig(),
    # configs/dvae.yaml: the embedded 64 px shapes dataset on a laptop CPU, 64 px -> 8x8 tokens of 512 codes.
    "cpu": DVAEConfig(vocab_size=512, n_hid=16, group_count=4, n_blk_per_group=1, n_init=64),
}


# ---------------------------------------------------------------------------------------------- convs
def init_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """Initialise a conv as the released dVAE does: weight ~ N(0, 1/sqrt(n_in * k**2)), zero bias."""
    n_in, kernel = conv.in_channels, conv.kernel_size[0]
    nn.init.normal_(conv.weight, std=1.0 / math.sqrt(n_in * kernel**2))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    return init_conv(nn.Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2))


class Fp32Conv2d(nn.Conv2d):
    """A conv that always computes in fp32, also under autocast (the released code's `use_float16=False`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the conv in fp32; returns fp32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float())


def _fp32_conv(n_in: int, n_out: int, kernel: int) -> Fp32Conv2d:
    conv = Fp32Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2)
    init_conv(conv)
    return conv


# --------------------------------------------------------------------------------------------- blocks
class _ResBlock(nn.Module):
    """`out = id_path(x) + post_gain * res_path(x)`; subclasses build `res_path`."""

    kernels: tuple[int, int, int, int]  # kernel sizes of conv_1 .. conv_4

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        if n_out % 4 != 0:
            raise ValueError(f"resblock width n_out={n_out} must be divisible by 4 (hidden width n_out/4)")
        n_hid = n_out // 4
        self.post_gain = 1.0 / n_layers**2  # PAPER.md A.2: small gain on each residual branch
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, kernel in enumerate(self.kernels):
            layers[f"relu_{i + 1}"] = nn.ReLU()
            layers[f"conv_{i + 1}"] = _conv(widths[i], widths[i + 1], kernel)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual update of x."""
        return self.id_path(x) + self.post_gain * self.res_path(x)


class EncoderBlock(_ResBlock):
    """Encoder resblock: 3x3, 3x3, 3x3, 1x1 convs at hidden width n_out / 4."""

    kernels = (3, 3, 3, 1)


class DecoderBlock(_ResBlock):
    """Decoder resblock: 1x1, 3x3, 3x3, 3x3 convs at hidden width n_out / 4."""

    kernels = (1, 3, 3, 3)


def _group(blocks: list[nn.Module], resize: tuple[str, nn.Module] | None) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict((f"block_{i + 1}", b) for i, b in enumerate(blocks))
    if resize is not None:
        layers[resize[0]] = resize[1]
    return nn.Sequential(layers)


def _check_sizes(group_count: int, n_blk_per_group: int, n_hid: int, vocab_size: int) -> None:
    for name, value in [("group_count", group_count), ("n_blk_per_group", n_blk_per_group)]:
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if n_hid < 4 or n_hid % 4 != 0:
        raise ValueError(f"n_hid={n_hid} must be a positive multiple of 4 (resblock hidden width n_hid/4)")
    if vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size} must be >= 2")


# ---------------------------------------------------------------------------------------------- model
class Encoder(nn.Sequential):
    """Image in (phi-mapped pixels, PAPER.md A.4) -> codebook logits [B, vocab_size, H/f, W/f].

    Children: `input` (7x7 conv), `group_1` ... `group_{group_count}` (resblocks, max-pool after all but
    the last), `output` (ReLU, fp32 1x1 conv). f = 2**(group_count - 1).
    """

    def __init__(
        self,
        vocab_size: int = 8192,
        n_hid: int = 256,
        group_count: int = 4,
        n_blk_per_group: int = 2,
        channels: int = 3,
        n_layers: int | None = None,
    ) -> None:
        _check_sizes(group_count, n_blk_per_group, n_hid, vocab_size)
        n_layers = n_layers or group_count * n_blk_per_group
        layers: OrderedDict[str, nn.Module] = OrderedDict(input=_conv(channels, n_hid, 7))
        width = n_hid
        for g in range(group_count):
            n_out = n_hid * 2**g
            blocks = []
            for _ in range(n_blk_per_group):
                blocks.append(EncoderBlock(width, n_out, n_layers))
                width = n_out
            pool = ("pool", nn.MaxPool2d(kernel_size=2)) if g < group_count - 1 else None
            layers[f"group_{g + 1}"] = _group(blocks, pool)
        layers["output"] = nn.Sequential(
            OrderedDict(relu=nn.ReLU(), conv=_fp32_conv(width, vocab_size, 1))  # fp32 logits
        )
        super().__init__(layers)
        self.channels, self.vocab_size = channels, vocab_size
        self.downsample = 2 ** (group_count - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab_size, H/f, W/f] (fp32) of phi-mapped images x [B, channels, H, W]."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"Encoder expects images [B, {self.channels}, H, W]; got {tuple(x.shape)}")
        return super().forward(x)


class Decoder(nn.Sequential):
    """(Soft) one-hot codes [B, vocab_size, h, w] -> logit-Laplace parameters [B, 2*channels, h*f, w*f].

    Children: `input` (fp32 1x1 conv, a codebook embedding), `group_1` ... `group_{group_count}`
    (resblocks, nearest 2x upsampling after all but the last), `output` (ReLU, 1x1 conv). Output
    channels [0, channels) are mu, [channels, 2*channels) are ln b.
    """

    def __init__(
        self,
        vocab_size: int = 8192,
        n_hid: int = 256,
        group_count: int = 4,
        n_blk_per_group: int = 2,
        n_init: int = 128,
        channels: int = 3,
        n_layers: int | None = None,
    ) -> None:
        _check_sizes(group_count, n_blk_per_group, n_hid, vocab_size)
        n_layers = n_layers or group_count * n_blk_per_group
        layers: OrderedDict[str, nn.Module] = OrderedDict(input=_fp32_conv(vocab_size, n_init, 1))
        width = n_init
        for g in range(group_count):
            n_out = n_hid * 2 ** (group_count - 1 - g)
            blocks = []
            for _ in range(n_blk_per_group):
                blocks.append(DecoderBlock(width, n_out, n_layers))
                width = n_out
            up = ("upsample", nn.Upsample(scale_factor=2, mode="nearest")) if g < group_count - 1 else None
            layers[f"group_{g + 1}"] = _group(blocks, up)
        layers["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=_conv(width, 2 * channels, 1)))
        super().__init__(layers)
        self.channels, self.vocab_size = channels, vocab_size
        self.upsample = 2 ** (group_count - 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logit-Laplace parameters [B, 2*channels, H, W] of (soft) one-hot codes z [B, vocab_size, h, w]."""
        if z.ndim != 4 or z.shape[1] != self.vocab_size:
            raise ValueError(f"Decoder expects codes [B, {self.vocab_size}, h, w]; got {tuple(z.shape)}")
        return super().forward(z)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Same as `forward(one_hot(tokens))`, with the input conv as an embedding lookup (no one-hot).

        Args:
            tokens: LongTensor [B, h, w] of code ids.

        Returns:
            Logit-Laplace parameters [B, 2*channels, h*f, w*f].
        """
        conv = self.input
        # A 1x1 conv on a one-hot vector selects one weight column: lookup + bias is the same number.
        weight = conv.weight[:, :, 0, 0].t().float()  # [vocab_size, n_init]
        x = nn.functional.embedding(tokens, weight) + conv.bias.float()  # [B, h, w, n_init]
        x = x.permute(0, 3, 1, 2).contiguous()  # [B, n_init, h, w]
        for name, module in self.named_children():
            if name != "input":
                x = module(x)
        return x


# ------------------------------------------------------------------------- the released OpenAI pickles
class _Opaque:
    """Stand-in for any class a pickle names that we do not trust or need: keeps its state, runs no code."""

    def __new__(cls, *args: object, **kwargs: object) -> _Opaque:
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state


# What a pickle of tensors legitimately needs; every other global becomes an `_Opaque` stand-in, so the
# released files load without their classes (which break on torch >= 1.11) and without running their code.
_TRUSTED_MODULES = ("torch._utils", "torch._tensor", "torch.storage", "torch.nn.parameter")
_LEAF_NAMES = {"w": "weight", "b": "bias"}  # the released Conv2d's parameter names -> nn.Conv2d's
_TRUSTED_NAMES = {("collections", "OrderedDict"), ("torch", "device"), ("torch", "Size")}


class _TensorOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if module in _TRUSTED_MODULES or (module, name) in _TRUSTED_NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return super().find_class(module, name)
        return type(name, (_Opaque,), {"__module__": module})


class _TensorOnlyPickle:
    """A `pickle_module` for `torch.load` whose unpickler maps untrusted classes to stand-ins."""

    __name__ = "lit_dalle_tensor_only_pickle"
    Unpickler = _TensorOnlyUnpickler

    @staticmethod
    def load(file: object, **kwargs: object) -> object:
        return _TensorOnlyUnpickler(file, **kwargs).load()


def _walk(obj: object, prefix: str, tensors: dict[str, torch.Tensor], attrs: dict[str, dict]) -> None:
    state = obj.__dict__ if isinstance(obj, _Opaque | nn.Module) else {}
    attrs[prefix.rstrip(".")] = {k: v for k, v in state.items() if isinstance(v, int | float)}
    for kind in ("_parameters", "_buffers"):
        for name, tensor in (state.get(kind) or {}).items():
            if tensor is not None:
                tensors[prefix + name] = tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _walk(child, f"{prefix}{name}.", tensors, attrs)


def read_openai_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, int | None]]:
    """Read a released OpenAI dVAE `encoder.pkl` or `decoder.pkl` without unpickling its classes.

    The files are pickled whole modules (`torch.save(module)`); their `dall_e` / torch.nn classes are
    replaced by inert stand-ins and only the tensors are kept. A plain state dict file also works.

    Args:
        path: the `encoder.pkl` or `decoder.pkl` file.

    Returns:
        The state dict renamed to our `Encoder` / `Decoder` names (`blocks.group_1.block_1.res_path.conv_1.w`
        -> `group_1.block_1.res_path.conv_1.weight`), and the sizes inferred from the tensors: `kind`
        ("encoder" or "decoder") and the `DVAEConfig` fields it determines.
    """
    obj = torch.load(path, map_location="cpu", pickle_module=_TensorOnlyPickle, weights_only=False)
    tensors: dict[str, torch.Tensor] = {}
    attrs: dict[str, dict] = {}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        tensors = dict(obj)
    else:
        _walk(obj, "", tensors, attrs)
    state = {}
    for key, tensor in tensors.items():
        module, _, leaf = key.removeprefix("blocks.").rpartition(".")
        state[f"{module}.{_LEAF_NAMES.get(leaf, leaf)}"] = tensor
    if "input.weight" not in state or "output.conv.weight" not in state:
        found = list(state)[:5]
        raise ValueError(f"{path}: no input or output conv, not an OpenAI dVAE file; found {found}")
    groups = sorted({k.split(".")[0] for k in state if k.startswith("group_")})
    blocks = {k.split(".")[1] for k in state if k.startswith("group_1.block_")}
    first = "group_1.block_1.res_path.conv_1.weight"
    kind = "encoder" if state[first].shape[-1] == 3 else "decoder"  # encoder resblocks start with a 3x3
    sizes: dict[str, int | None] = {"group_count": len(groups), "n_blk_per_group": len(blocks)}
    n_in, n_out = state["input.weight"].shape[1], state["input.weight"].shape[0]
    if kind == "encoder":
        sizes.update(channels=n_in, n_hid=n_out, vocab_size=state["output.conv.weight"].shape[0])
    else:
        out = state["output.conv.weight"]
        sizes.update(vocab_size=n_in, n_init=n_out, n_hid=out.shape[1], channels=out.shape[0] // 2)
    # The released code computes post_gain from its own group_count attribute: read it where stored.
    block = attrs.get("blocks.group_1.block_1", {})
    n_layers = block.get("n_layers")
    if n_layers is None and block.get("post_gain"):
        n_layers = round(block["post_gain"] ** -0.5)
    default = sizes["group_count"] * sizes["n_blk_per_group"]
    sizes["n_layers"] = None if n_layers in (None, default) else int(n_layers)
    return state, {"kind": kind, **sizes}  # type: ignore[dict-item]
