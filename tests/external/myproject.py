"""A downstream project that extends lit_dalle without touching it (tests/test_extension.py runs it).

It lives outside the package and is imported by path: subclasses of the DVAE, the Prior and the data
module, a new attention mask kind, and a callback, all selected from YAML by ``class_path``.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from lit_dalle import DVAE, Prior, TextImageDataModule, register_mask_kind
from lit_dalle.models.masks import stream_mask
from lit_dalle.models.transformer import Transformer


@register_mask_kind("recent")
def recent_mask(text_len: int, grid: int, kernel: int = 11) -> torch.Tensor:
    """Image tokens see all text and the ``kernel`` most recent image tokens (a sliding window)."""
    return stream_mask(text_len, grid, lambda d: d < kernel)


class TaggedData(TextImageDataModule):
    """Captions keep their case and get a prefix (a normalisation hook)."""

    @staticmethod
    def normalize_caption(text: str) -> str:
        return "tagged: " + " ".join(text.split())


class HalfDepthTransformer(Transformer):
    """A transformer subclass: the network hook returns it."""


class MyPrior(Prior):
    """A Prior with its own network class and an extra loss term (the loss hook)."""

    def build_transformer(self, config):
        return HalfDepthTransformer(config)

    def loss(self, text, image):
        out = super().loss(text, image)
        out["image_share"] = out["loss_image"] * self.hparams.image_loss_weight / out["loss"]
        return out


class MyDVAE(DVAE):
    """A DVAE subclass selected by class_path (nothing overridden: the point is that it loads)."""


class Recorder(L.Callback):
    """Writes what it saw to ``path`` when training ends."""

    def __init__(self, path: str) -> None:
        self.path, self.captions = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.captions.extend(batch["caption"])

    def on_train_end(self, trainer, pl_module):
        kinds = getattr(getattr(pl_module, "transformer", None), "mask_kinds", None)
        network = type(getattr(pl_module, "transformer", pl_module)).__name__
        Path(self.path).write_text(json.dumps({"captions": self.captions, "mask_kinds": kinds, "network": network,
                                               "module": type(pl_module).__name__}))  # fmt: skip
