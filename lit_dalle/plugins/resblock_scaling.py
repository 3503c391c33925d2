"""The parts of per-resblock gradient scaling (PAPER.md C.2, C.3).

The resblock protocol, two autograd functions placed around each residual branch, and the scales with
their update rule.

Backward through resblock r (C.2, Fig. 4), with s = s_r / M (see `ResblockScales.effective`)::

    fp32 stream grad --[_ScaleOut: * s, cast to the branch's dtype]--> 16-bit backward of res_path
        --[_UnscaleIn: Inf/NaN -> 0 (and flagged), / s, fp32]--> added to the fp32 stream grad

The branch's parameter gradients come out multiplied by s; the precision plugin divides them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["NonFiniteFlags", "ResblockScales", "find_resblocks", "scale_branch_input", "scale_branch_output"]


def find_resblocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The resblocks of ``module`` by name: its outermost submodules with an ``nn.Module`` attribute ``res_path``.

    The protocol (STYLE.md 3, `lit_dalle.models.transformer.ResBlock`): a resblock computes
    ``x + g * res_path(x, ...)``; ``res_path`` takes the fp32 residual stream ``x`` as its first positional
    argument and returns one tensor. A block inside another block's ``res_path`` shares that block's scale.
    """
    blocks: list[tuple[str, nn.Module]] = []
    for name, sub in module.named_modules():  # pre-order: a block comes before what it contains
        inside = any(name.startswith(f"{outer}.") if outer else True for outer, _ in blocks)
        if not inside and isinstance(getattr(sub, "res_path", None), nn.Module):
            blocks.append((name, sub))
    return blocks


class NonFiniteFlags:
    """Per resblock: did an outgoing activation gradient hold an Inf or NaN since the last `take`?"""

    def __init__(self, count: int) -> None:
        self.count = count
        self._flags: Tensor | None = None  # [count] bool, on the gradients' device; made on first use

    def record(self, index: int, bad: Tensor) -> None:
        """OR a 0-d bool into block ``index``'s flag (no host sync)."""
        if self._flags is None or self._flags.device != bad.device:
            self._flags = torch.zeros(self.count, dtype=torch.bool, device=bad.device)
        self._flags[index] |= bad

    def take(self, device: torch.device) -> Tensor:
        """The flags ``[count]`` on ``device``, then reset them."""
        flags, self._flags = self._flags, None
        return flags.to(device) if flags is not None else torch.zeros(self.count, dtype=torch.bool, device=device)


class _ScaleOut(torch.autograd.Function):
    """At a branch's output. Forward: cast to fp32 (the stream's dtype). Backward: * s, cast to the branch dtype."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, scale: float) -> Tensor:
        ctx.scale, ctx.dtype = scale, out.dtype
        return out.float() if out.dtype != torch.float32 else out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return (grad * ctx.scale).to(ctx.dtype), None  # values past the 16-bit range become Inf: caught below


class _UnscaleIn(torch.autograd.Function):
    """At a branch's input. Forward: identity. Backward: flag and zero Inf/NaN, then / s, in the stream's dtype."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float, flags: NonFiniteFlags, index: int) -> Tensor:
        ctx.scale, ctx.flags, ctx.index = scale, flags, index
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        bad = ~torch.isfinite(grad)
        ctx.flags.record(ctx.index, bad.any())
        return grad.masked_fill(bad, 0.0) / ctx.scale, None, None, None


def scale_branch_input(x: Tensor, scale: float, flags: NonFiniteFlags, index: int) -> Tensor:
    """Wrap a branch input: its gradient is filtered and divided by ``scale`` (see the module docstring)."""
    return _UnscaleIn.apply(x, scale, flags, index)


def scale_branch_output(out: Tensor, scale: float) -> Tensor:
    """Wrap a branch output: fp32 forward; its gradient is multiplied by ``scale`` into the branch's dtype."""
    return _ScaleOut.apply(out, scale)


class ResblockScales:
    """The scales s_r of named resblocks and their update rule (PAPER.md C.3), in the paper's units (they include M).

    Args:
        names: the resblocks' module names (checked again when a checkpoint is loaded).
        replicas: M, the number of data-parallel replicas.
        init, growth, backoff, cooldown, min_scale, max_scale: C.3's rule, ``init``, ``min_scale`` and
            ``max_scale`` before the factor M.
    """

    def __init__(
        self,
        names: Sequence[str],
        replicas: int = 1,
        init: float = 2.0**13,
        growth: float = 2.0 ** (1 / 1000),
        backoff: float = math.sqrt(2.0),
        cooldown: int = 125,
        min_scale: float = 2.0**7,
        max_scale: float = 2.0**24,
    ) -> None:
        if not (growth >= 1.0 and backoff > 1.0 and cooldown >= 0 and 0 < min_scale <= init <= max_scale):
            raise ValueError(
                f"need growth >= 1, backoff > 1, cooldown >= 0 and 0 < min_scale <= init <= max_scale; got {growth=}, "
                f"{backoff=}, {cooldown=}, {min_scale=}, {init=}, {max_scale=} (PAPER.md C.3: 2**(1/1000), sqrt(2), "
                "125, 2**7, 2**13, 2**24)"
            )
        self.names, self.replicas = list(names), replicas
        self.growth, self.backoff, self.cooldown = growth, backoff, cooldown
        self.min_scale, self.max_scale = min_scale, max_scale
        self.scales = torch.full((len(self.names),), replicas * init, dtype=torch.float64)  # [R]
        self.last_drop = torch.full((len(self.names),), -cooldown, dtype=torch.long)  # update of the last division
        self.updates = 0  # optimizer steps seen, skipped ones included
        self.skipped = 0
        self.effective = (self.scales / replicas).tolist()

    def update(self, nonfinite: Tensor, skipped: bool) -> None:
        """Apply one update of C.3's rule.

        A flagged scale is divided by ``backoff`` unless it was within ``cooldown`` updates; every clean
        scale grows by ``growth`` (also on a skipped step: the per-resblock reading of C.3, G.8), then all
        are clamped to ``[M * min_scale, M * max_scale]``.

        Args:
            nonfinite: ``[R]`` bool, True where resblock r had a non-finite gradient this update.
            skipped: whether this update was skipped (counted in ``skipped``).
        """
        nonfinite = nonfinite.cpu()
        drop = nonfinite & (self.updates - self.last_drop >= self.cooldown)
        grown = torch.where(nonfinite, self.scales, self.scales * self.growth)
        m = self.replicas
        self.scales = torch.where(drop, self.scales / self.backoff, grown).clamp(m * self.min_scale, m * self.max_scale)
        self.last_drop = torch.where(drop, self.updates, self.last_drop)
        self.updates += 1
        self.skipped += int(skipped)
        self.effective = (self.scales / m).tolist()

    def state_dict(self) -> dict[str, Any]:
        """Everything `load_state_dict` needs to continue the rule exactly."""
        return {"names": list(self.names), "replicas": self.replicas, "scales": self.scales.clone(),
                "last_drop": self.last_drop.clone(), "updates": self.updates, "skipped": self.skipped}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`; scales are rescaled by M_now / M_saved (C.5: they carry the factor M)."""
        if list(state["names"]) != self.names:
            raise ValueError(
                f"the checkpoint's per-resblock scales are for {len(state['names'])} resblocks "
                f"({state['names'][:2]}...), this model has {len(self.names)} ({self.names[:2]}...): resume the "
                "same architecture, or drop the 'PerResblockScaling' entry from the checkpoint to start the scales anew"
            )
        self.scales = state["scales"].double().cpu() * (self.replicas / state["replicas"])
        self.last_drop = state["last_drop"].long().cpu()
        self.updates, self.skipped = int(state["updates"]), int(state["skipped"])
        self.effective = (self.scales / self.replicas).tolist()
