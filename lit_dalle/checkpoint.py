"""What every lit_dalle checkpoint records about the library that wrote it, and the checks on loading.

``lit_dalle.version`` is the library version; ``lit_dalle.format`` the checkpoint layout, bumped whenever
a change makes older checkpoints unloadable. Loading a checkpoint of another major version warns; one of
another layout fails with a message naming both versions, instead of a cryptic state-dict error.
"""

from __future__ import annotations

import warnings
from typing import Any

CHECKPOINT_FORMAT = 1
"""The checkpoint layout this version reads and writes."""


class VersionedCheckpoint:
    """Mixin for LightningModules: stamps checkpoints with the library version and checks it on load."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the library version and checkpoint layout."""
        from lit_dalle import __version__

        checkpoint["lit_dalle"] = {"version": __version__, "format": CHECKPOINT_FORMAT}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse another checkpoint layout; warn on another major version."""
        check_checkpoint_version(checkpoint)


def check_checkpoint_version(checkpoint: dict[str, Any]) -> None:
    """Raise if ``checkpoint`` has another layout; warn if another major version wrote it.

    Raises:
        ValueError: naming the version that wrote the checkpoint and this version.
    """
    from lit_dalle import __version__

    stamp = checkpoint.get("lit_dalle")
    if stamp is None:
        warnings.warn("this checkpoint carries no lit_dalle version; loading it as the current layout", stacklevel=2)
        return
    if stamp.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint written by lit_dalle {stamp.get('version')} (layout {stamp.get('format')}) cannot be loaded "
            f"by lit_dalle {__version__} (layout {CHECKPOINT_FORMAT}); install lit_dalle=={stamp.get('version')} to "
            "use it"
        )
    if str(stamp.get("version", "")).split(".")[0] != __version__.split(".")[0]:
        warnings.warn(
            f"checkpoint written by lit_dalle {stamp.get('version')}, loading with {__version__} (another major "
            "version): check the CHANGELOG",
            stacklevel=2,
        )
