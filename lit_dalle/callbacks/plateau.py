"""The Prior's learning rate: linear warm-up, then halving whenever the training loss plateaus (PAPER.md B.6).

The paper warms up linearly to 4.5e-4 over 5,000 updates, then halves the rate "whenever training loss
appears to plateau", 5 times in all, with no fixed schedule. "Appears to plateau" is made concrete here:
an exponential moving average of the training loss has not improved by ``min_improvement`` (relative)
for ``patience`` updates. The counters are callback state, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from typing_extensions import override

__all__ = ["WarmupHalveOnPlateau"]


class WarmupHalveOnPlateau(L.Callback):
    """Linear warm-up to ``peak_lr``, then multiply by ``factor`` at each training-loss plateau.

    Args:
        peak_lr: the rate reached at the end of warm-up (PAPER.md B.6: 4.5e-4).
        warmup_steps: length of the linear warm-up in updates (PAPER.md B.6: 5,000).
        factor: multiplier applied at each plateau (PAPER.md B.6: 1/2).
        max_reductions: at most this many reductions (PAPER.md B.6: 5, ending at peak / 32).
        patience: updates without improvement that make a plateau.
        min_improvement: relative improvement of the smoothed loss that resets the patience.
        smoothing: weight of the past in the loss's moving average (0.99: about 100 updates).
    """

    def __init__(
        self,
        peak_lr: float = 4.5e-4,
        warmup_steps: int = 5000,
        factor: float = 0.5,
        max_reductions: int = 5,
        patience: int = 2000,
        min_improvement: float = 0.01,
        smoothing: float = 0.99,
    ) -> None:
        if peak_lr <= 0 or not 0 < factor < 1 or warmup_steps < 0 or patience < 1 or not 0 <= smoothing < 1:
            raise ValueError(
                "WarmupHalveOnPlateau needs peak_lr > 0, 0 < factor < 1, warmup_steps >= 0, patience >= 1 and "
                f"0 <= smoothing < 1; got {peak_lr}, {factor}, {warmup_steps}, {patience}, {smoothing}"
            )
        self.peak_lr, self.warmup_steps, self.factor = peak_lr, warmup_steps, factor
        self.max_reductions, self.patience = max_reductions, patience
        self.min_improvement, self.smoothing = min_improvement, smoothing
        self.reductions, self.since_best = 0, 0
        self.best, self.average = math.inf, math.nan

    def lr(self, step: int) -> float:
        """The rate for update ``step`` (0-based) given the reductions so far."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return self.peak_lr * warm * self.factor**self.reductions

    def observe(self, step: int, loss: float) -> None:
        """Feed one training loss; after warm-up, count a reduction when the smoothed loss plateaus."""
        if not math.isfinite(loss):
            return
        self.average = loss if math.isnan(self.average) else self.smoothing * self.average + (1 - self.smoothing) * loss
        if step < self.warmup_steps:
            return
        if self.average < self.best * (1 - self.min_improvement):
            self.best, self.since_best = self.average, 0
        else:
            self.since_best += 1
        if self.since_best >= self.patience and self.reductions < self.max_reductions:
            self.reductions += 1
            self.best, self.since_best = self.average, 0

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        lr = self.lr(trainer.global_step)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        pl_module.log_dict({"schedule/lr": lr, "schedule/lr_reductions": float(self.reductions)}, on_step=True,
                           on_epoch=False, batch_size=1)  # fmt: skip

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.observe(trainer.global_step, float(loss))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "reductions": self.reductions,
            "since_best": self.since_best,
            "best": self.best,
            "average": self.average,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reductions, self.since_best = state_dict["reductions"], state_dict["since_best"]
        self.best, self.average = state_dict["best"], state_dict["average"]
