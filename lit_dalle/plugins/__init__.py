"""Lightning plugins: fp16 with per-resblock gradient scaling (PAPER.md C), sharding + PowerSGD (PAPER.md D)."""

from lit_dalle.plugins.powersgd import CrossNodeReducer
from lit_dalle.plugins.precision import PerResblockScaling
from lit_dalle.plugins.resblock_scaling import ResblockScales, find_resblocks
from lit_dalle.plugins.strategy import DDPPowerSGD, ShardedPowerSGD, uncompressed_parameter_names

__all__ = [
    "CrossNodeReducer",
    "DDPPowerSGD",
    "PerResblockScaling",
    "ResblockScales",
    "ShardedPowerSGD",
    "find_resblocks",
    "uncompressed_parameter_names",
]
