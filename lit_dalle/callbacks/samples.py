"""Reranked sample grids during training (PAPER.md E.1: N samples per caption, the best K by a contrastive model).

`SampleLogger` generates ``num_samples`` images for each of a fixed list of captions every
``every_n_steps`` updates and at the end of each validation, keeps the ``top`` best by a scorer
(`lit_dalle.rerank.load_scorer`: a `Contrastive` checkpoint or a Hugging Face CLIP folder), and logs one
captioned grid. It samples without gradients, in eval mode, with the EMA weights when an `EMA` callback is
present (the trained weights are put back afterwards), with a fixed seed (grids of successive steps
compare like for like), and on global rank 0 only (on every rank when parameters are sharded, since
sampling needs their all-gathers; only rank 0 writes).

Each grid is written as ``samples/step-XXXXXXX.png`` in the run's log folder (or ``default_root_dir``)
and, with a TensorBoard logger, as the image ``samples`` (captions in the picture and as text). It works
without a logger, and without a scorer (samples kept in sampling order; the log says so once).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

__all__ = ["SampleLogger"]


class SampleLogger(L.Callback):
    """Generate, rerank and log captioned sample grids of a module with ``generate(captions, seed=...)``.

    Args:
        captions: the captions to sample for; None takes the first ``num_captions`` captions of the first
            validation batch (fixed for the run).
        num_captions: how many validation captions to take when ``captions`` is None.
        num_samples: images sampled per caption (N).
        top: images kept per caption (K, the best by the scorer; without one, the first K).
        scorer: a `Contrastive` checkpoint or a Hugging Face CLIP folder; None: no reranking.
        every_n_steps: sample every n optimizer updates (None or 0: only at validation ends).
        at_validation: sample at the end of each validation (not the sanity check).
        seed: sampling seed (the same for every grid).
        temperature: sampling temperature (the paper: 1).
    """

    def __init__(
        self,
        captions: list[str] | None = None,
        num_captions: int = 4,
        num_samples: int = 8,
        top: int = 4,
        scorer: str | None = None,
        every_n_steps: int | None = None,
        at_validation: bool = True,
        seed: int = 0,
        temperature: float = 1.0,
    ) -> None:
        if not 1 <= top <= num_samples:
            raise ValueError(f"SampleLogger: need 1 <= top <= num_samples; got top={top}, num_samples={num_samples}")
        if captions is not None and not captions:
            raise ValueError("SampleLogger: captions is an empty list; give captions or None (validation captions)")
        self.captions = list(captions) if captions else None
        self.num_captions, self.num_samples, self.top = num_captions, num_samples, top
        self.scorer_path, self.every_n_steps, self.at_validation = scorer, every_n_steps or 0, at_validation
        self.seed, self.temperature = seed, temperature
        self._scorer: Any = None
        self._last_step = self._sampled_at = -1
        self.written: list[Path] = []
        self._folder = Path("samples")  # set in setup

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the module can sample; load the scorer (a wrong path fails before training starts).

        The output folder is resolved here, on every rank: ``trainer.log_dir`` broadcasts under DDP, so
        reading it later on rank 0 alone would hang the job.
        """
        self._folder = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        if not callable(getattr(pl_module, "generate", None)):
            name = type(pl_module).__name__
            raise TypeError(f"SampleLogger needs a module with generate(captions, ...); {name} has none")
        if self.scorer_path and self._scorer is None:
            from lit_dalle.rerank import load_scorer

            self._scorer = load_scorer(self.scorer_path)
        elif not self.scorer_path:
            log.info("SampleLogger: no scorer given; samples are kept in sampling order, not reranked")

    def _sharded(self, pl_module: L.LightningModule) -> bool:
        return any(hasattr(p, "to_local") for p in pl_module.parameters())

    def _captions(self, trainer: L.Trainer) -> list[str]:
        if self.captions is None:
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
            if loader is None:
                raise ValueError("SampleLogger: no captions given and no validation data to take them from")
            self.captions = list(next(iter(loader))["caption"][: self.num_captions])
        return self.captions

    @torch.no_grad()
    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        """Sample, rerank and write one grid now (what the hooks call); returns the PNG written on rank 0."""
        if not (trainer.is_global_zero or self._sharded(pl_module)) or trainer.global_step == self._sampled_at:
            return None  # (validation right after a scheduled grid at the same step would repeat it)
        self._sampled_at = trainer.global_step
        from lit_dalle.callbacks.ema import EMA
        from lit_dalle.generate import captioned_sheet, select

        ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)  # type: ignore[attr-defined]
        captions = self._captions(trainer)
        was_training = pl_module.training
        pl_module.eval()
        rows = []
        try:
            with ema.applied(pl_module) if ema is not None else nullcontext():
                for index, caption in enumerate(captions):
                    images = pl_module.generate(
                        [caption] * self.num_samples, seed=self.seed + index, temperature=self.temperature
                    )
                    rows.append((caption, select(caption, images, self.top, self._scorer).cpu()))
        finally:
            pl_module.train(was_training)
        return self._write(trainer, captioned_sheet(rows)) if trainer.is_global_zero else None

    @rank_zero_only
    def _write(self, trainer: L.Trainer, sheet: Any) -> Path:
        self._folder.mkdir(parents=True, exist_ok=True)
        path = self._folder / f"step-{trainer.global_step:07d}.png"
        sheet.save(path)
        self.written.append(path)
        picture = torch.from_numpy(np.asarray(sheet).copy()).permute(2, 0, 1)
        how = f"best {self.top} of {self.num_samples}" + (
            f" by {self.scorer_path}" if self._scorer else " (not reranked)"
        )
        text = f"{how}: " + " | ".join(self.captions or [])
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", picture, trainer.global_step)
                logger.experiment.add_text("samples/captions", text, trainer.global_step)
        return path

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Sample every ``every_n_steps`` optimizer updates."""
        step = trainer.global_step
        if self.every_n_steps and step != self._last_step and step % self.every_n_steps == 0:
            self.log_samples(trainer, pl_module)
        self._last_step = step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Sample after each validation (not the sanity check)."""
        if self.at_validation and not trainer.sanity_checking:
            self.log_samples(trainer, pl_module)
