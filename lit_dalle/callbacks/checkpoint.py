"""``ModelCheckpoint`` that also writes ``last.ckpt`` when training stops between periodic saves.

Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` at train end only when it never saved
one before: a run stopped by ``max_time`` (the CPU configs' hard stop), or by ``max_steps`` off the saving
period, loses every update since the last periodic save, silently (seen here: a quickstart Prior stopped at
update ~780 with ``last.ckpt`` at 750). This subclass saves ``last.ckpt`` at train end whenever it is older
than the final update. Everything else is Lightning's.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from typing_extensions import override

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, plus ``last.ckpt`` at the final update when training ends (a drop-in)."""

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)
