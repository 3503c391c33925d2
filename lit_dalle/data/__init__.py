"""Data: tar shards, decoding, the paper's augmentations, the embedded dataset and the DataModule."""

from lit_dalle.data.augment import CenterResize, DVAEAugment, PriorAugment
from lit_dalle.data.datamodule import SkippedSamplesLogger, TextImageDataModule
from lit_dalle.data.embedded import EmbeddedShapes, ensure_embedded
from lit_dalle.data.shards import ShardSpecError, expand_shards, write_shards

__all__ = [
    "CenterResize",
    "DVAEAugment",
    "EmbeddedShapes",
    "PriorAugment",
    "ShardSpecError",
    "SkippedSamplesLogger",
    "TextImageDataModule",
    "ensure_embedded",
    "expand_shards",
    "write_shards",
]
