"""SampleLogger: when it samples, with which weights, what it writes, and how it fails on bad settings."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from lit_dalle.callbacks import EMA, SampleLogger

CAPTIONS = ["a red circle", "a large blue square", "a small green triangle"]


class Painter(L.LightningModule):
    """Learns a colour; `generate` paints it (plus seeded noise) and records the state it was called in."""

    def __init__(self):
        super().__init__()
        self.colour = torch.nn.Parameter(torch.zeros(3))
        self.calls = []

    def training_step(self, batch, batch_idx):
        return (self.colour - torch.tensor([2.0, -2.0, 1.0])).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)

    def generate(self, captions, seed=0, temperature=1.0):
        ema = next((c for c in self.trainer.callbacks if isinstance(c, EMA)), None)
        self.calls.append({
            "step": self.trainer.global_step, "training": self.training, "grad": torch.is_grad_enabled(),
            "colour": self.colour.detach().clone(), "ema": None if ema is None else ema.ema["colour"].clone(),
        })  # fmt: skip
        noise = torch.rand(len(captions), 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.2
        return (self.colour.sigmoid()[None, :, None, None] * 0.8 + noise).clamp(0, 1)


class Snapshot(L.Callback):
    """Records the parameters before and after the callbacks between two of these run."""

    def __init__(self, store):
        self.store = store

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.store.append(pl_module.colour.detach().clone())


def batches(n=8):
    return DataLoader([{"caption": c} for c in CAPTIONS * n], batch_size=3, collate_fn=lambda b: {
        "caption": [x["caption"] for x in b]})  # fmt: skip


def fit(tmp_path, sampler, *, ema=None, logger=False, steps=6):
    model, before, after = Painter(), [], []
    callbacks = [c for c in (ema, Snapshot(before), sampler, Snapshot(after)) if c is not None]
    trainer = L.Trainer(max_steps=steps, default_root_dir=tmp_path, logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
                        val_check_interval=steps, check_val_every_n_epoch=None, limit_val_batches=1)  # fmt: skip
    trainer.fit(model, batches(), batches(1))
    return model, before, after


def test_samples_every_n_steps_and_after_validation_with_ema_weights_then_restores(tmp_path):
    ema = EMA(decay=0.5)
    sampler = SampleLogger(captions=CAPTIONS[:2], num_samples=4, top=2, every_n_steps=2)
    model, before, after = fit(tmp_path, sampler, ema=ema)
    assert [c["step"] for c in model.calls] == [2, 2, 4, 4, 6, 6]  # 2 captions at steps 2, 4, 6 (once at 6)
    for call in model.calls:
        assert not call["training"] and not call["grad"]
        assert torch.equal(call["colour"], call["ema"])  # sampled with the average, not the trained weights
    assert not torch.equal(model.calls[0]["colour"], before[1])  # ... which differ from it
    assert all(torch.equal(b, a) for b, a in zip(before, after))  # and the trained weights are back after
    pngs = sorted((tmp_path / "samples").glob("*.png"))
    assert [p.name for p in pngs] == ["step-0000002.png", "step-0000004.png", "step-0000006.png"]
    width, height = Image.open(pngs[0]).size
    assert width == 2 * 18 + 2 and height == 2 * (20 + 14)  # 2 kept images of 16 px per row, a caption band each


def test_tensorboard_gets_the_grid_and_captions_and_validation_captions_are_the_default(tmp_path, caplog):
    logger = TensorBoardLogger(tmp_path, name="tb")
    sampler = SampleLogger(num_captions=2, num_samples=3, top=3, every_n_steps=0)
    with caplog.at_level(logging.INFO, logger="lit_dalle.callbacks.samples"):
        model, _, _ = fit(tmp_path, sampler, logger=logger, steps=4)
    assert sampler.captions == CAPTIONS[:2]  # taken from the first validation batch
    assert [c["step"] for c in model.calls] == [4, 4]  # only after the validation at step 4
    assert sum("not reranked" in r.message for r in caplog.records) == 1
    events = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [4]
    assert (tmp_path / "tb" / "version_0" / "samples" / "step-0000004.png").is_file()


def test_reranks_with_a_scorer(tmp_path, trained_clip):
    sampler = SampleLogger(captions=CAPTIONS[:1], num_samples=4, top=1, scorer=str(trained_clip), every_n_steps=2)
    fit(tmp_path, sampler, steps=2)
    assert sampler._scorer is not None and len(sampler.written) == 1


def test_bad_settings_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="top <= num_samples"):
        SampleLogger(num_samples=2, top=3)
    with pytest.raises(ValueError, match="empty list"):
        SampleLogger(captions=[])

    class NoGenerate(Painter):
        generate = None

    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, callbacks=[SampleLogger()],
                        default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(TypeError, match="generate"):
        trainer.fit(NoGenerate(), batches())
    with pytest.raises(FileNotFoundError, match="--rerank"):
        L.Trainer(max_steps=1, logger=False, callbacks=[SampleLogger(scorer=str(tmp_path / "x.ckpt"))],
                  default_root_dir=tmp_path).fit(Painter(), batches())  # fmt: skip
