"""Lightning callbacks: schedules (cosine, warm-up with halving on plateau), the EMA of the weights, sample grids."""

from lit_dalle.callbacks.annealing import (
    CosineSchedule,
    KLWeightSchedule,
    LearningRateSchedule,
    TemperatureSchedule,
    cosine,
)
from lit_dalle.callbacks.checkpoint import ModelCheckpoint
from lit_dalle.callbacks.ema import EMA, ema_state_dict, load_with_ema
from lit_dalle.callbacks.plateau import WarmupHalveOnPlateau
from lit_dalle.callbacks.samples import SampleLogger

__all__ = [
    "EMA",
    "CosineSchedule",
    "KLWeightSchedule",
    "LearningRateSchedule",
    "ModelCheckpoint",
    "SampleLogger",
    "TemperatureSchedule",
    "WarmupHalveOnPlateau",
    "cosine",
    "ema_state_dict",
    "load_with_ema",
]
