import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lit_dalle.callbacks import EMA, ema_state_dict, load_with_ema


class Tiny(L.LightningModule):
    """Records its weights at every train step and the weights it validates with."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)
        self.frozen = torch.nn.Linear(1, 1).requires_grad_(False)
        self.trained = []  # weights after each optimizer step (recorded at the next batch)
        self.validated = []

    def training_step(self, batch, batch_idx):
        self.trained.append(self.layer.weight.detach().clone())
        return (self.layer(batch[0]) ** 2).sum()

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.validated.append(self.layer.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(n=2):  # checkpoints fall on epoch ends, so a resumed run sees the same batches
    return DataLoader(TensorDataset(torch.randn(n, 3, generator=torch.Generator().manual_seed(0))), batch_size=1)


def _fit(tmp_path, ema, max_steps, ckpt_path=None, val=False, **kw):
    torch.manual_seed(0)
    model = Tiny()
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=[ema, ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, save_on_train_epoch_end=True)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=1 if val else 0,
        num_sanity_val_steps=0,
        **kw,
    )
    trainer.fit(model, _data(), _data() if val else None, ckpt_path=ckpt_path)
    return model, trainer


def test_ema_is_the_exponential_average_of_the_updates(tmp_path):
    ema = EMA(decay=0.5, copy_at_end=False)
    model, _ = _fit(tmp_path, ema, max_steps=4)
    weights = [*model.trained[1:], model.layer.weight.detach()]  # after updates 1..4
    expected = model.trained[0]
    for w in weights:
        expected = 0.5 * expected + 0.5 * w
    torch.testing.assert_close(ema.ema["layer.weight"], expected)
    assert ema.num_updates == 4 and "frozen.weight" not in ema.ema


def test_every_n_steps_and_accumulation(tmp_path):
    ema = EMA(decay=0.99, every_n_steps=3)
    _fit(tmp_path, ema, max_steps=6)
    assert ema.num_updates == 2  # after updates 3 and 6 (the Prior's "0.99 every 25 steps")
    ema = EMA(decay=0.99)
    _fit(tmp_path / "acc", ema, max_steps=3, accumulate_grad_batches=2)
    assert ema.num_updates == 3  # once per optimizer update, not per micro-batch


def test_validation_uses_ema_and_training_weights_come_back(tmp_path):
    ema = EMA(decay=0.9, copy_at_end=False)
    model, _ = _fit(tmp_path, ema, max_steps=6, val=True)  # validates at the epoch end (after step 6)
    torch.testing.assert_close(model.validated[-1], ema.ema["layer.weight"])
    assert not torch.allclose(model.validated[-1], model.layer.weight)


def test_copy_at_end_exports_the_average(tmp_path):
    ema = EMA(decay=0.9)
    model, _ = _fit(tmp_path, ema, max_steps=4)
    torch.testing.assert_close(model.layer.weight, ema.ema["layer.weight"])
    other = Tiny()
    ema.copy_to(other)
    torch.testing.assert_close(other.layer.weight, ema.ema["layer.weight"])


def test_resume_restores_the_average_exactly(tmp_path):
    _fit(tmp_path, EMA(decay=0.7), max_steps=2)
    ckpt = tmp_path / "epoch=0-step=2.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    (state,) = [s for k, s in saved["callbacks"].items() if k.startswith("EMA")]
    resumed_ema = EMA(decay=0.7, copy_at_end=False)
    model, _ = _fit(tmp_path / "resumed", resumed_ema, max_steps=5, ckpt_path=str(ckpt))
    # the average goes on from the saved one (not re-initialised, no update repeated or lost)
    torch.testing.assert_close(model.trained[0], saved["state_dict"]["layer.weight"], rtol=0, atol=0)
    expected = state["ema"]["layer.weight"]
    for w in [*model.trained[1:], model.layer.weight.detach()]:
        expected = 0.7 * expected + 0.3 * w
    assert resumed_ema.num_updates == 5
    torch.testing.assert_close(resumed_ema.ema["layer.weight"], expected)
    # with gradient accumulation, a resume neither repeats nor skips an update
    acc_ema = EMA(decay=0.7)
    _fit(tmp_path / "acc", acc_ema, max_steps=3, ckpt_path=str(ckpt), accumulate_grad_batches=2)
    assert acc_ema.num_updates == 3
    # export from a checkpoint file: EMA weights replace the trained ones, the rest is kept
    weights = ema_state_dict(saved)
    torch.testing.assert_close(weights["layer.weight"], state["ema"]["layer.weight"])
    assert not torch.equal(weights["layer.weight"], saved["state_dict"]["layer.weight"])
    assert torch.equal(weights["frozen.weight"], saved["state_dict"]["frozen.weight"])


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)
    with pytest.raises(ValueError, match="every_n_steps"):
        EMA(every_n_steps=0)


def test_works_on_fsdp2_local_shards():
    """The average lives on DTensor local shards: no deepcopy of the module (FSDP2 refuses deepcopy)."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.fsdp import fully_shard

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        reference = copy.deepcopy(model)
        fully_shard(model, mesh=torch.distributed.device_mesh.init_device_mesh("cpu", (1,)))
        assert hasattr(model[0].weight, "to_local")
        with pytest.raises(Exception):  # noqa: B017 - why Lightning's EMAWeightAveraging fails there
            copy.deepcopy(model)
        ema = EMA(decay=0.5)
        ema._init(model)
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().add_(1.0)
        ema.update(model)
        ema.copy_to(reference)
        torch.testing.assert_close(reference[0].weight, model[0].weight.to_local() - 0.5)
    finally:
        dist.destroy_process_group()


def test_load_with_ema_exports_the_average_or_the_trained_weights(tmp_path):
    _fit(tmp_path, EMA(decay=0.7), max_steps=2)
    ckpt = str(tmp_path / "epoch=0-step=2.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    (state,) = [s for k, s in saved["callbacks"].items() if k.startswith("EMA")]
    averaged = load_with_ema(Tiny, ckpt)
    trained = load_with_ema(Tiny, ckpt, use_ema=False)
    assert not averaged.training
    torch.testing.assert_close(averaged.layer.weight, state["ema"]["layer.weight"], rtol=0, atol=0)
    torch.testing.assert_close(trained.layer.weight, saved["state_dict"]["layer.weight"], rtol=0, atol=0)
