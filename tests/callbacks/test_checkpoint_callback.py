"""lit_dalle's ModelCheckpoint keeps the final update in last.ckpt where Lightning's keeps the last periodic one."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lit_dalle.callbacks import ModelCheckpoint


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("cls", "expected"), [(LightningModelCheckpoint, 5), (ModelCheckpoint, 7)])
def test_last_checkpoint_holds_the_final_update(tmp_path, cls, expected):
    checkpoint = cls(dirpath=tmp_path, save_last=True, every_n_train_steps=5)
    trainer = L.Trainer(max_steps=7, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    model = Tiny()
    trainer.fit(model, DataLoader(TensorDataset(torch.randn(32, 2)), batch_size=2))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == expected  # Lightning's loses updates 6 and 7; ours has them
    if expected == 7:
        assert torch.equal(saved["state_dict"]["layer.weight"], model.layer.weight.detach())
