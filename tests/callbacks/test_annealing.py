import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lit_dalle.callbacks import (
    CosineSchedule,
    KLWeightSchedule,
    LearningRateSchedule,
    TemperatureSchedule,
    cosine,
)


def test_cosine_endpoints_midpoint_and_hold():
    assert cosine(0, 1.0, 0.0, 10) == 1.0
    assert cosine(5, 1.0, 0.0, 10) == pytest.approx(0.5)
    assert cosine(10, 1.0, 0.0, 10) == 0.0
    assert cosine(10_000, 1.0, 0.0, 10) == 0.0  # held at the end value
    assert cosine(3, 2.0, 2.0, 0) == 2.0
    # log space: the geometric midpoint
    assert cosine(5, 1.0, 1 / 16, 10, log_space=True) == pytest.approx(0.25)


def test_paper_defaults():
    beta, tau, lr = KLWeightSchedule(), TemperatureSchedule(), LearningRateSchedule()
    assert (beta.start, beta.end, beta.steps, beta.attribute) == (0.0, 6.6, 5_000, "kl_weight")
    assert (tau.start, tau.end, tau.steps, tau.attribute) == (1.0, 1 / 16, 150_000, "temperature")
    assert (lr.start, lr.end, lr.steps, lr.attribute) == (1e-4, 1.25e-6, 1_200_000, "lr")
    assert beta.value(2_500) == pytest.approx(3.3)
    assert tau.value(150_000) == 1 / 16 and lr.value(3_000_000) == 1.25e-6


class Recorder(L.LightningModule):
    """Records kl_weight, temperature and lr seen in each training step."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.kl_weight, self.temperature = -1.0, -1.0
        self.seen = []

    def training_step(self, batch, batch_idx):
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.seen.append((self.global_step, self.kl_weight, self.temperature, lr))
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=123.0)


def _fit(tmp_path, max_steps, ckpt_path=None, **trainer_kw):
    torch.manual_seed(0)
    model = Recorder()
    callbacks = [
        KLWeightSchedule(start=0.0, end=6.6, steps=4),
        TemperatureSchedule(start=1.0, end=1 / 16, steps=6, log_space=True),
        LearningRateSchedule(start=1e-2, end=1e-4, steps=8),
        ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1),
    ]
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **trainer_kw,
    )
    data = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=1)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, callbacks


def test_schedules_follow_global_step(tmp_path):
    model, (beta, tau, lr, _) = _fit(tmp_path, max_steps=10)
    assert [s[0] for s in model.seen] == list(range(10))
    for step, kl, temp, rate in model.seen:
        assert kl == beta.value(step) and temp == tau.value(step) and rate == lr.value(step)
    assert model.seen[-1][1:] == (6.6, 1 / 16, 1e-4)  # held after the end


def test_gradient_accumulation_keeps_one_value_per_update(tmp_path):
    model, (beta, *_) = _fit(tmp_path, max_steps=3, accumulate_grad_batches=2)
    assert [s[0] for s in model.seen] == [0, 0, 1, 1, 2, 2]
    assert [s[1] for s in model.seen] == [beta.value(s[0]) for s in model.seen]


def test_resume_restores_the_schedules_exactly(tmp_path):
    full, _ = _fit(tmp_path / "full", max_steps=9)
    _fit(tmp_path / "part", max_steps=3)
    resumed, _ = _fit(tmp_path / "part", max_steps=9, ckpt_path=str(tmp_path / "part" / "epoch=0-step=3.ckpt"))
    assert resumed.seen[0][0] == 3
    assert resumed.seen == full.seen[3:]


def test_unknown_attribute_is_named(tmp_path):
    model = Recorder()
    trainer = L.Trainer(
        max_steps=1,
        callbacks=[CosineSchedule("kl_wieght", 0.0, 1.0, 5)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(AttributeError, match="kl_wieght"):
        trainer.fit(model, DataLoader(TensorDataset(torch.randn(2, 2)), batch_size=1))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="steps=-1"):
        KLWeightSchedule(steps=-1)
    with pytest.raises(ValueError, match="log_space"):
        CosineSchedule("x", 0.0, 1.0, 5, log_space=True)
    assert math.isclose(TemperatureSchedule(log_space=True).value(75_000), 0.25)
