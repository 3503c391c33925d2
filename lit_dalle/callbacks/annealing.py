"""Cosine schedules of a LightningModule attribute or of the learning rate (PAPER.md A.5).

Each value is a pure function of `trainer.global_step` (the number of optimizer updates), set before
every training batch, so resuming from a checkpoint restores it exactly with no state of its own.
After `steps` updates the value stays at `end` (the paper does not say; PAPER.md A.5, G.4).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from typing_extensions import override

__all__ = ["CosineSchedule", "KLWeightSchedule", "LearningRateSchedule", "TemperatureSchedule", "cosine"]


def cosine(step: int, start: float, end: float, steps: int, log_space: bool = False) -> float:
    """Half-cosine from start (step 0) to end (step >= steps): end + (start - end) (1 + cos(pi t / T)) / 2.

    With log_space, the same curve runs between ln(start) and ln(end) (both must be > 0).
    """
    if steps <= 0 or step >= steps:
        return end
    frac = 0.5 * (1 + math.cos(math.pi * max(step, 0) / steps))
    if log_space:
        return math.exp(math.log(end) + (math.log(start) - math.log(end)) * frac)
    return end + (start - end) * frac


class CosineSchedule(L.Callback):
    """Anneal `pl_module.<attribute>` (or every optimizer's lr, attribute="lr") by a half-cosine.

    Args:
        attribute: the LightningModule attribute to set (e.g. "kl_weight", "temperature"), or "lr" for the
            learning rate of every param group of every optimizer.
        start: value at global step 0.
        end: value from global step `steps` on.
        steps: length of the schedule in optimizer updates.
        log_space: interpolate ln(value) instead of the value.
        log_name: key under which the current value is logged each step; None: "schedule/<attribute>".
    """

    def __init__(
        self,
        attribute: str,
        start: float,
        end: float,
        steps: int,
        log_space: bool = False,
        log_name: str | None = None,
    ) -> None:
        if steps < 0:
            raise ValueError(f"{type(self).__name__}: steps={steps} must be >= 0")
        if log_space and (start <= 0 or end <= 0):
            raise ValueError(f"{type(self).__name__}: log_space needs start, end > 0; got {start}, {end}")
        self.attribute, self.start, self.end, self.steps = attribute, start, end, steps
        self.log_space = log_space
        self.log_name = log_name or f"schedule/{attribute}"

    def value(self, step: int) -> float:
        """The scheduled value after `step` optimizer updates."""
        return cosine(step, self.start, self.end, self.steps, self.log_space)

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """Set the value for the current `trainer.global_step`; returns it."""
        value = self.value(trainer.global_step)
        if self.attribute == "lr":
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = value
        elif not hasattr(pl_module, self.attribute):
            raise AttributeError(
                f"{type(self).__name__}(attribute={self.attribute!r}): {type(pl_module).__name__} has no "
                f"attribute {self.attribute!r}; name one it reads every step (or 'lr')"
            )
        else:
            setattr(pl_module, self.attribute, value)
        return value

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(trainer, pl_module)  # also right after a resume, before the first batch

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        value = self.apply(trainer, pl_module)
        pl_module.log(self.log_name, value, on_step=True, on_epoch=False, batch_size=1)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.attribute != "lr":  # e.g. the temperature of the relaxed validation loss
            self.apply(trainer, pl_module)


class KLWeightSchedule(CosineSchedule):
    """The KL weight beta: cosine increase 0 -> 6.6 over the first 5,000 updates (PAPER.md A.5)."""

    def __init__(
        self,
        start: float = 0.0,  # PAPER.md A.5 (App. A.2)
        end: float = 6.6,  # PAPER.md A.5 (App. A.2); fn. 4 on why 6.6
        steps: int = 5_000,  # PAPER.md A.5 (App. A.2)
        attribute: str = "kl_weight",
        log_name: str | None = None,
    ) -> None:
        super().__init__(attribute, start, end, steps, log_name=log_name)


class TemperatureSchedule(CosineSchedule):
    """The Gumbel-softmax temperature tau: cosine 1 -> 1/16 over the first 150,000 updates (PAPER.md A.5)."""

    def __init__(
        self,
        start: float = 1.0,  # PAPER.md A.5 (App. A.2)
        end: float = 1 / 16,  # PAPER.md A.5 (App. A.2); Sec. 2.1: closes the relaxed / true ELB gap
        steps: int = 150_000,  # PAPER.md A.5 (App. A.2); a linear schedule usually diverged
        log_space: bool = False,  # PAPER.md G.4: linear or log space is not stated
        attribute: str = "temperature",
        log_name: str | None = None,
    ) -> None:
        super().__init__(attribute, start, end, steps, log_space=log_space, log_name=log_name)


class LearningRateSchedule(CosineSchedule):
    """The learning rate: cosine 1e-4 -> 1.25e-6 over 1,200,000 updates (PAPER.md A.5)."""

    def __init__(
        self,
        start: float = 1e-4,  # PAPER.md A.5 (App. A.2)
        end: float = 1.25e-6,  # PAPER.md A.5 (App. A.2); held from 1.2 M to 3 M updates
        steps: int = 1_200_000,  # PAPER.md A.5 (App. A.2)
        log_name: str | None = "schedule/lr",
    ) -> None:
        super().__init__("lr", start, end, steps, log_name=log_name)
