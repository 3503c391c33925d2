"""Exponential moving average of the weights (PAPER.md A.5: decay 0.999 for the dVAE; B.6: 0.99 every 25).

The average is kept on each parameter's *local* tensor (a DTensor's `to_local()` shard), so it needs no
deep copy of the module and keeps working when parameters are sharded with FSDP2 (Lightning's
`EMAWeightAveraging` deep-copies the module and fails there, STACK.md). Validation runs on the averaged
weights (swapped in, then back); the average is saved in the checkpoint and restored on resume;
`copy_to` (and `copy_at_end`) put it into the module for export.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from typing_extensions import override

__all__ = ["EMA", "ema_state_dict", "load_with_ema"]


def _local(p: Tensor) -> Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # DTensor (FSDP2): this rank's shard


def _local_params(module: nn.Module) -> dict[str, Tensor]:
    return {name: _local(p.detach()) for name, p in module.named_parameters() if p.requires_grad}


class EMA(L.Callback):
    """EMA of the trainable parameters: every `every_n_steps` updates, ema <- decay ema + (1 - decay) p.

    Args:
        decay: weight of the old average (PAPER.md A.5: 0.999 for the dVAE; B.6: 0.99 for the Prior).
        every_n_steps: apply the update after every n-th optimizer update (B.6: 25 for the Prior).
        validate_with_ema: run validation on the averaged weights.
        copy_at_end: leave the averaged weights in the module when `fit` ends (for export).
    """

    def __init__(
        self, decay: float = 0.999, every_n_steps: int = 1, validate_with_ema: bool = True, copy_at_end: bool = True
    ) -> None:
        if not 0.0 <= decay < 1.0 or every_n_steps < 1:
            raise ValueError(f"EMA: need 0 <= decay < 1 and every_n_steps >= 1; got {decay}, {every_n_steps}")
        self.decay, self.every_n_steps = decay, every_n_steps
        self.validate_with_ema, self.copy_at_end = validate_with_ema, copy_at_end
        self.ema: dict[str, Tensor] | None = None  # fp32 copies of the local parameter tensors
        self.num_updates, self._last_step = 0, -1
        self._backup: dict[str, Tensor] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay, every_n_steps=self.every_n_steps)

    def _init(self, pl_module: L.LightningModule) -> None:
        params = _local_params(pl_module)
        if self.ema is None:
            self.ema = {n: p.float().clone() for n, p in params.items()}
        elif self.ema.keys() != params.keys():
            raise RuntimeError("EMA state from the checkpoint names other parameters than the module has")
        else:  # restored from a checkpoint: follow the parameters' devices
            self.ema = {n: self.ema[n].to(p.device, torch.float32) for n, p in params.items()}

    @torch.no_grad()
    def update(self, pl_module: L.LightningModule) -> None:
        """One EMA update from the module's current parameters."""
        params = _local_params(pl_module)
        assert self.ema is not None
        ema = list(self.ema.values())
        torch._foreach_lerp_(ema, [params[n].float() for n in self.ema], 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into module's parameters (the export path)."""
        if self.ema is None:
            raise RuntimeError("EMA.copy_to: no average yet (call it after fit starts or a checkpoint loads)")
        for name, p in _local_params(module).items():
            p.copy_(self.ema[name])

    @torch.no_grad()
    def _swap_in(self, module: nn.Module) -> None:
        self._backup = {n: p.clone() for n, p in _local_params(module).items()}
        self.copy_to(module)

    @torch.no_grad()
    def _swap_out(self, module: nn.Module) -> None:
        if self._backup is not None:
            for name, p in _local_params(module).items():
                p.copy_(self._backup[name])
            self._backup = None

    @contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Run the body with the averaged weights in ``module``, then put the trained weights back.

        A no-op before the first update and while the average is already in (during validation).
        """
        if self.ema is None or self._backup is not None:
            yield
            return
        self._swap_in(module)
        try:
            yield
        finally:
            self._swap_out(module)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._init(pl_module)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # restored by now: a resume repeats no update

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # counts optimizer updates: unchanged on accumulation micro-batches
        if step != self._last_step and step % self.every_n_steps == 0:
            self.update(pl_module)
        self._last_step = step

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.validate_with_ema and self.ema is not None:
            self._swap_in(pl_module)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.copy_at_end and self.ema is not None:
            self.copy_to(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "num_updates": self.num_updates, "decay": self.decay}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema, self.num_updates = state_dict["ema"], state_dict["num_updates"]


def ema_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The checkpoint's model state dict with the EMA weights in place of the trained ones (for export).

    Example: `model.load_state_dict(ema_state_dict(torch.load(path, weights_only=True)))`.
    """
    states = [s for k, s in checkpoint.get("callbacks", {}).items() if k.startswith("EMA") and s.get("ema")]
    if len(states) != 1:
        raise ValueError(f"expected one EMA callback state in the checkpoint; found {len(states)}")
    weights = dict(checkpoint["state_dict"])
    weights.update({name: ema.to(weights[name].dtype) for name, ema in states[0]["ema"].items()})
    return weights


def load_with_ema(cls: type[L.LightningModule], path: str, *, use_ema: bool = True, **kwargs: Any) -> L.LightningModule:
    """``cls.load_from_checkpoint(path, **kwargs)``, then the EMA weights when asked and the checkpoint has them.

    The one export path for trained modules (tokenizing with a DVAE, sampling from a Prior), in eval mode.
    """
    kwargs.setdefault("map_location", "cpu")
    model = cls.load_from_checkpoint(path, **kwargs)
    if use_ema:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        if any(k.startswith("EMA") for k in checkpoint.get("callbacks", {})):
            model.load_state_dict(ema_state_dict(checkpoint))
    return model.eval()
