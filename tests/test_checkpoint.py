"""Checkpoints record the library version; other layouts fail clearly, other major versions warn."""

import pytest
import torch

import lit_dalle
from lit_dalle.checkpoint import CHECKPOINT_FORMAT
from lit_dalle.prior import Prior

TINY = dict(text_vocab=300, text_len=8, image_size=32, image_vocab=64, downsample=8, depth=1, width=16, heads=2)


@pytest.fixture
def checkpoint(tmp_path):
    import lightning as L

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(Prior(**TINY))
    path = tmp_path / "prior.ckpt"
    trainer.save_checkpoint(path)
    return path


def _rewrite(path, **stamp):
    ckpt = torch.load(path, weights_only=False)
    ckpt["lit_dalle"].update(stamp)
    torch.save(ckpt, path)


def test_checkpoints_carry_the_version(checkpoint):
    stamp = torch.load(checkpoint, weights_only=False)["lit_dalle"]
    assert stamp == {"version": lit_dalle.__version__, "format": CHECKPOINT_FORMAT}
    Prior.load_from_checkpoint(checkpoint)


def test_another_layout_fails_naming_both_versions(checkpoint):
    _rewrite(checkpoint, version="9.0.0", format=CHECKPOINT_FORMAT + 1)
    with pytest.raises(ValueError, match=rf"lit_dalle 9\.0\.0 .* by lit_dalle {lit_dalle.__version__}"):
        Prior.load_from_checkpoint(checkpoint)


def test_another_major_version_warns(checkpoint):
    _rewrite(checkpoint, version="7.3.1")
    with pytest.warns(UserWarning, match="another major version"):
        Prior.load_from_checkpoint(checkpoint)
