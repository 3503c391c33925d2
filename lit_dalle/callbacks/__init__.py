"""Lightning callbacks: schedules (cosine, warm-up with halving on plateau) and the EMA of the weights."""

from lit_dalle.callbacks.annealing import (
    CosineSchedule,
    KLWeightSchedule,
    LearningRateSchedule,
    TemperatureSchedule,
    cosine,
)
from lit_dalle.callbacks.ema import EMA, ema_state_dict, load_with_ema
from lit_dalle.callbacks.plateau import WarmupHalveOnPlateau

__all__ = [
    "EMA",
    "CosineSchedule",
    "KLWeightSchedule",
    "LearningRateSchedule",
    "TemperatureSchedule",
    "WarmupHalveOnPlateau",
    "cosine",
    "ema_state_dict",
    "load_with_ema",
]
