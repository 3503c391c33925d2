"""``TextImageDataModule``: paired text-image tar shards for the DVAE and the Prior.

Batches are dicts: ``image`` uint8 [B, 3, R, R] from the loader, turned into float [0, 1] on the
device (``on_after_batch_transfer``, so workers and host-to-device copies move a quarter of the bytes),
``caption`` (lowercased strings), ``key``, ``meta`` (parsed ``KEY.json`` or None). With no shards given,
the embedded shapes dataset is generated into the cache (``embedded.py``) and used for every split.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from lit_dalle.data.augment import AUGMENTATIONS, CenterResize
from lit_dalle.data.dataset import EpochDataLoader, ShardDataset, key_fraction
from lit_dalle.data.decode import SKIP_REASONS, Sample, SkipCounter, decode_sample, normalize_caption
from lit_dalle.data.embedded import EmbeddedShapes, ensure_embedded
from lit_dalle.data.shards import expand_shards

log = logging.getLogger(__name__)

ShardSpec = str | list[str]


def _keep_if(key: str, fraction: float, keep_below: bool) -> bool:
    """Hash split: a key is validation when its stable hash falls below ``fraction``."""
    return (key_fraction(key) < fraction) == keep_below


class TextImageDataModule(L.LightningDataModule):
    """Text-image pairs from WebDataset tar shards (img2dataset layout), or the embedded dataset.

    Args:
        train_shards: training shards: a path, brace pattern, glob, folder, or a list of them.
            None uses the embedded shapes dataset (see ``embedded``) for every split.
        val_shards: validation shards. None with ``val_fraction`` > 0 holds out a hash-chosen fraction
            of the training shards' keys; None otherwise means no validation.
        test_shards: test shards (``test``/``predict``); None falls back to the validation data
            (for the embedded dataset: its held-out attribute combinations).
        val_fraction: fraction of training keys held out for validation when ``val_shards`` is None,
            chosen by a hash of the key (stable across runs and world sizes).
        resolution: side R of the square images in a batch.
        batch_size: training samples per batch and per process.
        val_batch_size: validation / test batch size; None uses ``batch_size``.
        num_workers: loader worker processes per rank; each reads its own shards.
        augment: training augmentation: "dvae" (PAPER.md A.6), "prior" (B.7) or "center" (none).
        shuffle_buffer: samples in each worker's shuffle buffer (training only).
        samples_per_epoch: None reads every training sample exactly once per epoch; a number makes
            each epoch that many samples (over all ranks) from a repeating stream, which keeps ranks in
            step when shards hold unequal counts.
        min_aspect_ratio: samples with width / height below this are skipped (the paper: 1/2).
        max_aspect_ratio: samples with width / height above this are skipped (the paper: 2).
        seed: seed of the shard-order shuffle.
        pin_memory: pin batches in page-locked memory (for CUDA).
        embedded: the embedded dataset used when ``train_shards`` is None.

    With several processes, validation and test shards of their own (and the embedded data's) are split by
    sample, not by shard: every rank runs the same number of batches, which sharded models need (every
    forward is collective), and a split of fewer shards than ranks leaves no rank idle. Each rank reads the
    whole split for this, and the last (fewer than world size) samples are left out. A ``val_fraction``
    split of the training shards stays split by shard (reading all training shards on every rank would
    cost too much), so its ranks may run unequal numbers of batches.
    """

    def __init__(
        self,
        train_shards: ShardSpec | None = None,
        val_shards: ShardSpec | None = None,
        test_shards: ShardSpec | None = None,
        val_fraction: float = 0.0,
        resolution: int = 64,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        augment: Literal["dvae", "prior", "center"] = "dvae",
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        min_aspect_ratio: float = 0.5,
        max_aspect_ratio: float = 2.0,
        seed: int = 0,
        pin_memory: bool = False,
        embedded: EmbeddedShapes = EmbeddedShapes(),  # noqa: B008  (a frozen-by-convention config value)
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["embedded"])
        self.hparams["embedded"] = asdict(embedded)  # plain data: checkpoints load with weights_only=True
        _check_positive(resolution=resolution, batch_size=batch_size, shuffle_buffer=shuffle_buffer)
        if val_batch_size is not None:
            _check_positive(val_batch_size=val_batch_size)
        if samples_per_epoch is not None:
            _check_positive(samples_per_epoch=samples_per_epoch)
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0 (0 reads in the main process)")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1), e.g. 0.01 for 1% of keys")
        if not 0 < min_aspect_ratio <= max_aspect_ratio:
            raise ValueError(
                f"aspect ratio bounds [{min_aspect_ratio}, {max_aspect_ratio}] must satisfy "
                "0 < min_aspect_ratio <= max_aspect_ratio (the paper uses [0.5, 2])"
            )
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment={augment!r} is not one of {sorted(AUGMENTATIONS)}")
        self.train_spec, self.val_spec, self.test_spec = train_shards, val_shards, test_shards
        self.val_fraction = val_fraction
        self.resolution, self.batch_size = resolution, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.augment, self.shuffle_buffer = num_workers, augment, shuffle_buffer
        self.samples_per_epoch, self.seed, self.pin_memory = samples_per_epoch, seed, pin_memory
        self.aspect = {"min_aspect_ratio": min_aspect_ratio, "max_aspect_ratio": max_aspect_ratio}
        self.embedded = replace(embedded, resolution=embedded.resolution or resolution)
        self.shards: dict[str, list[str]] = {}
        self._datasets: dict[str, ShardDataset] = {}

    # -- hooks: override these in a subclass -----------------------------------------------------------

    @staticmethod
    def normalize_caption(text: str) -> str:
        """How a caption is normalised before tokenization: lowercase, collapse whitespace (PAPER.md B.1).

        Override it to keep case, strip boilerplate, translate, ... It runs in the loader workers, so it
        must not use the data module's state. Example::

            class KeepCase(TextImageDataModule):
                @staticmethod
                def normalize_caption(text: str) -> str:
                    return " ".join(text.split())
        """
        return normalize_caption(text)

    @staticmethod
    def decode_sample(raw: dict[str, Any], skips: SkipCounter, **kwargs: Any) -> Sample | None:
        """How a raw shard sample (``{"__key__", "jpg", "txt", ...}``) becomes a `Sample`, or None to skip it.

        Override it to read other members (e.g. a caption from ``KEY.json``) or to filter more; count what
        you skip with ``skips.skip(reason, where)``. It runs in the loader workers. ``kwargs`` carry the
        aspect-ratio bounds, the decode size and ``normalize`` (this class's `normalize_caption`). Example::

            class JsonCaptions(TextImageDataModule):
                @staticmethod
                def decode_sample(raw, skips, **kwargs):
                    raw = {**raw, "txt": json.loads(raw["json"])["caption"].encode()}
                    return decode_sample(raw, skips, **kwargs)
        """
        return decode_sample(raw, skips, **kwargs)

    # -- preparation ---------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Generate the embedded dataset into the cache when it is used and missing (local rank 0)."""
        if self.train_spec is None:
            ensure_embedded(self.embedded)

    def setup(self, stage: str | None = None) -> None:
        """Resolve every shard spec; a pattern that matches nothing fails here, before training."""
        if self.train_spec is None:
            folders = ensure_embedded(self.embedded, progress=False)  # a no-op after prepare_data
            specs: dict[str, ShardSpec | None] = {k: str(v) for k, v in folders.items()}
            specs = {"train": specs["train"], "val": specs["val"], "test": specs["heldout"]}
        else:
            specs = {"train": self.train_spec, "val": self.val_spec, "test": self.test_spec}
            if specs["val"] is None and self.val_fraction > 0:
                specs["val"] = self.train_spec
        self.shards = {split: expand_shards(spec) for split, spec in specs.items() if spec is not None}
        self._warn_uneven()
        if self.trainer is not None and not any(isinstance(c, SkippedSamplesLogger) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(SkippedSamplesLogger())

    def _warn_uneven(self) -> None:
        """Warn when ranks may get unequal shard counts in an exact-pass epoch (DDP would then stall)."""
        _, world = self._rank_world()
        shards = len(self.shards.get("train", []))
        if world > 1 and self.samples_per_epoch is None and shards % world:
            rank_zero_warn(
                f"{shards} training shards do not split evenly over {world} ranks; ranks may run out "
                "of data at different steps. Set `data.samples_per_epoch` to a fixed count per epoch."
            )

    def _rank_world(self) -> tuple[int, int]:
        """This process's data-parallel rank and world size (trainer first, then torch.distributed)."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    # -- loaders -------------------------------------------------------------------------------------

    def _dataset(self, split: str, train: bool) -> ShardDataset:
        """The streaming dataset of one split."""
        if split not in self.shards:
            self.setup()
        rank, world = self._rank_world()
        key_filter: Callable[[str], bool] | None = None
        if self.train_spec is not None and self.val_spec is None and self.val_fraction > 0:
            if split in ("train", "val"):
                key_filter = partial(_keep_if, fraction=self.val_fraction, keep_below=split == "val")
        transform = AUGMENTATIONS[self.augment](self.resolution) if train else CenterResize(self.resolution)
        return ShardDataset(
            self.shards[split],
            transform,
            self.batch_size if train else self.val_batch_size,
            rank=rank,
            world_size=world,
            shuffle=train,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            key_filter=key_filter,
            samples_per_epoch=self.samples_per_epoch if train else None,
            decode=partial(type(self).decode_sample, normalize=type(self).normalize_caption),
            split_by="sample" if not train and key_filter is None and world > 1 else "shard",
            **self.aspect,
        )

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        """A loader over one split, with this module's worker settings."""
        dataset = self._datasets["train" if train else "val" if split == "val" else "test"] = self._dataset(
            split, train
        )
        workers = self.num_workers
        return EpochDataLoader(
            dataset,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=train and workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        """Training batches, augmented with the recipe named by ``augment``."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation batches (centre crop); an empty list when there is no validation data."""
        if self.val_spec is None and self.train_spec is not None and self.val_fraction == 0:
            return []
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test batches: the test shards, else the validation data."""
        return self._loader("test" if "test" in self.shards or self.test_spec is not None else "val")

    def predict_dataloader(self) -> DataLoader:
        """Prediction batches: the same data as ``test_dataloader``."""
        return self.test_dataloader()

    def skip_counts(self, stage: Literal["train", "val", "test"] = "train") -> dict[str, int]:
        """Samples skipped so far by this rank's current loader of ``stage``, per reason."""
        dataset = self._datasets.get(stage)
        return dataset.skip_counts() if dataset is not None else {}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Turn uint8 images into float [0, 1] on the device (a quarter of the bytes cross the bus)."""
        if (
            isinstance(batch, dict)
            and isinstance(batch.get("image"), torch.Tensor)
            and batch["image"].dtype == torch.uint8
        ):
            batch["image"] = batch["image"].float().div_(255)
        return batch


def _check_positive(**values: int) -> None:
    """Raise a clear error for a setting that must be a positive integer."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name}={value} must be a positive integer")


class SkippedSamplesLogger(L.Callback):
    """Logs how many samples the data module skipped, per reason, summed over ranks.

    ``TextImageDataModule.setup`` adds it to the trainer when absent, so skipped samples are always
    visible as ``data/skipped_<reason>`` metrics (and ``data/skipped_total``).
    """

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, TextImageDataModule):
            return
        counts = datamodule.skip_counts(stage)  # type: ignore[arg-type]
        prefix = "data/skipped_" if stage == "train" else f"data/{stage}_skipped_"
        values = {f"{prefix}{reason}": float(counts.get(reason, 0)) for reason in SKIP_REASONS}
        values[f"{prefix}total"] = float(sum(counts.values()))
        train = stage == "train"
        pl_module.log_dict(values, on_step=train, on_epoch=not train, sync_dist=True, reduce_fx="sum")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Log the running training totals (the logger writes them every ``log_every_n_steps``)."""
        self._log(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the validation totals at the end of each validation run."""
        self._log(trainer, pl_module, "val")
