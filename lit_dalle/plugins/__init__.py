"""Lightning plugins: fp16 with per-resblock gradient scaling (PAPER.md C)."""

from lit_dalle.plugins.precision import PerResblockScaling
from lit_dalle.plugins.resblock_scaling import ResblockScales, find_resblocks

__all__ = ["PerResblockScaling", "ResblockScales", "find_resblocks"]
