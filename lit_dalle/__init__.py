"""lit_dalle: DALL-E ("Zero-Shot Text-to-Image Generation", Ramesh et al. 2021) as Lightning modules.

The public API is what ``__all__`` lists; everything else is private by name or by module.
"""

__version__ = "0.1.0"

from lit_dalle.callbacks import (
    EMA,
    CosineSchedule,
    KLWeightSchedule,
    LearningRateSchedule,
    SampleLogger,
    TemperatureSchedule,
    WarmupHalveOnPlateau,
)
from lit_dalle.contrastive import Contrastive
from lit_dalle.data import (
    CenterResize,
    DVAEAugment,
    EmbeddedShapes,
    PriorAugment,
    TextImageDataModule,
    write_shards,
)
from lit_dalle.dvae import DVAE
from lit_dalle.models.masks import MASK_KINDS, register_mask_kind
from lit_dalle.plugins import DDPPowerSGD, PerResblockScaling, ShardedPowerSGD
from lit_dalle.prior import Prior
from lit_dalle.text import TextTokenizer

__all__ = [
    "DVAE",
    "EMA",
    "MASK_KINDS",
    "CenterResize",
    "Contrastive",
    "CosineSchedule",
    "DDPPowerSGD",
    "DVAEAugment",
    "EmbeddedShapes",
    "KLWeightSchedule",
    "LearningRateSchedule",
    "PerResblockScaling",
    "Prior",
    "PriorAugment",
    "SampleLogger",
    "ShardedPowerSGD",
    "TemperatureSchedule",
    "TextImageDataModule",
    "TextTokenizer",
    "WarmupHalveOnPlateau",
    "__version__",
    "register_mask_kind",
    "write_shards",
]
