"""A tiny LightningModule that consumes the DataModule's batches (for data and CLI tests only)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class TinyModel(L.LightningModule):
    """Predicts an image's mean colour from a learned constant; records the keys it saw.

    Args:
        lr: SGD learning rate.
    """

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.colour = torch.nn.Parameter(torch.zeros(3))
        self.seen: list[str] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        assert batch["image"].dtype == torch.float32 and batch["image"].max() <= 1.0
        self.seen.extend(batch["key"])
        loss = (batch["image"].mean(dim=(2, 3)) - self.colour).pow(2).mean()
        self.log("train/loss", loss, batch_size=len(batch["key"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = (batch["image"].mean(dim=(2, 3)) - self.colour).pow(2).mean()
        self.log("val/loss", loss, batch_size=len(batch["key"]))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
