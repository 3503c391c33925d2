"""A streaming dataset over tar shards, split by rank and by loader worker.

Each epoch, the shard list is shuffled with a seed shared by every rank (seed + epoch), then rank r of W
takes shards r, r + W, ... and worker k of K of that rank takes every K-th of those. Every shard is read
by exactly one worker of one rank, so every sample is seen exactly once per epoch (unless
``samples_per_epoch`` asks for a fixed-length, repeating stream, which keeps ranks in lock step when
shards hold unequal numbers of samples). Evaluation data can instead be split by sample
(``split_by="sample"``): every worker reads all the shards, and sample i of the valid stream goes to rank
i mod W, so every rank yields the same number of samples and batches whatever the shard sizes.
Batching happens in the workers. Skipped samples are counted
in a shared-memory table with one row per worker (no two writers share a row), which the main process
reads with ``skip_counts()``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lit_dalle.data.decode import SKIP_REASONS, Sample, SkipCounter, decode_sample

log = logging.getLogger(__name__)

_MAX_WORKERS = 256  # rows of the shared skip table; workers beyond this share rows (counts may then race)


def key_fraction(key: str) -> float:
    """Map a sample key to a stable number in [0, 1) (the same on every run, rank and machine)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def collate(samples: list[Sample]) -> dict[str, Any]:
    """Stack samples into a batch dict: image uint8 [B, 3, R, R] (or image_tokens [B, h, w]), caption, key, meta."""
    if samples[0].tokens is not None:
        visual = {"image_tokens": torch.stack([s.tokens for s in samples])}  # type: ignore[misc]
    else:
        visual = {"image": torch.stack([s.image for s in samples])}  # type: ignore[misc]
    return {
        **visual,
        "caption": [s.caption for s in samples],
        "key": [s.key for s in samples],
        "meta": [s.meta for s in samples],
    }


class _UncountedSkips(SkipCounter):
    """Skips that another reader counts and reports (``split_by="sample"``: all readers see all samples)."""

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        """Ignore: rank 0's first worker records this skip."""


class ShardDataset(IterableDataset):
    """Batches of decoded, augmented samples streamed from tar shards.

    Args:
        shards: shard paths or URLs (already expanded, see ``expand_shards``).
        transform: maps a uint8 [3, H, W] image to uint8 [3, R, R] (see ``augment.py``).
        batch_size: samples per batch (the last batch of a worker may be smaller).
        rank: this process's rank among ``world_size`` data-parallel processes.
        world_size: number of data-parallel processes reading these shards.
        shuffle: shuffle shard order each epoch and samples through a buffer.
        shuffle_buffer: samples held in the shuffle buffer (per worker).
        seed: base seed of the shard-order shuffle (shared by all ranks, so the split is a partition).
        key_filter: keep a sample only when this returns True for its key (train / val hash split).
        min_aspect_ratio: smallest accepted width / height.
        max_aspect_ratio: largest accepted width / height.
        samples_per_epoch: when set, each rank yields ``samples_per_epoch // world_size`` samples per
            epoch from a repeating stream instead of one exact pass.
        decode: turns a raw shard sample into a `Sample` or None (see `decode_sample`); it runs in the
            loader workers, so it must pickle (a module-level function, a staticmethod, a partial of one).
        split_by: "shard" (each shard read by one worker of one rank) or "sample" (an exact pass where
            every worker reads every shard and valid sample i goes to rank i mod W, then to that rank's
            workers in turn; the last i >= W * (N // W) are left out, so all ranks yield N // W samples
            in equal batches). "sample" reads the data W x K times: meant for evaluation splits, where
            ranks must run the same number of batches (sharded models) and a few shards must not leave
            ranks idle. Not with ``samples_per_epoch``.
    """

    def __init__(
        self,
        shards: list[str],
        transform: Callable[[torch.Tensor], torch.Tensor],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        key_filter: Callable[[str], bool] | None = None,
        min_aspect_ratio: float = 0.5,
        max_aspect_ratio: float = 2.0,
        samples_per_epoch: int | None = None,
        decode: Callable[..., Sample | None] = decode_sample,
        split_by: Literal["shard", "sample"] = "shard",
    ) -> None:
        super().__init__()
        if split_by not in ("shard", "sample"):
            raise ValueError(f"split_by={split_by!r}: use 'shard' or 'sample'")
        if split_by == "sample" and samples_per_epoch is not None:
            raise ValueError("split_by='sample' is an exact pass: leave samples_per_epoch unset")
        self.split_by = split_by
        self.decode = decode
        self.shards, self.transform, self.batch_size = list(shards), transform, batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.key_filter = key_filter
        self.aspect = (min_aspect_ratio, max_aspect_ratio)
        self.samples_per_epoch = samples_per_epoch
        # Shared memory, so that loader workers (forked or spawned) see the epoch the main process set.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._skips = torch.zeros(_MAX_WORKERS, len(SKIP_REASONS), dtype=torch.int64).share_memory_()

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped so far, per reason, summed over this rank's workers (cumulative).

        With ``split_by="sample"`` rank 0 holds the whole split's counts and the other ranks none.
        """
        return {reason: int(n) for reason, n in zip(SKIP_REASONS, self._skips.sum(0)) if n > 0}

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the shard shuffle (called by ``EpochDataLoader``)."""
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        """Batches per epoch on this rank; defined only for a fixed ``samples_per_epoch``."""
        if self.samples_per_epoch is None:
            raise TypeError("ShardDataset has no length unless samples_per_epoch is set")
        per_rank = self.samples_per_epoch // self.world_size
        return -(-per_rank // self.batch_size)

    def worker_shards(self, worker: int, num_workers: int) -> list[str]:
        """The shards that loader worker ``worker`` of this rank reads this epoch.

        In an exact pass a worker may get none (more readers than shards). With ``samples_per_epoch`` every
        reader needs a stream, so a worker without shards of its own re-reads one of its rank's, and a rank
        without shards re-reads one of the whole list: samples may then repeat within the epoch.
        """
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + int(self._epoch)).shuffle(shards)
        if self.split_by == "sample":
            return shards  # every worker reads everything; `_sample_split` picks its share
        rank_shards = shards[self.rank :: self.world_size]
        if self.samples_per_epoch is not None and not rank_shards:
            rank_shards = [shards[self.rank % len(shards)]]
        mine = rank_shards[worker::num_workers]
        if self.samples_per_epoch is not None and not mine:
            mine = [rank_shards[worker % len(rank_shards)]]
        return mine

    def _raw_samples(self, shards: list[str], skips: SkipCounter) -> Iterator[dict[str, Any]]:
        """Raw samples of the given shards; a truncated or unreadable shard is counted once, not fatal."""
        for url in shards:
            errors: list[Exception] = []

            def on_error(exn: Exception, errors: list[Exception] = errors) -> bool:
                errors.append(exn)
                return True  # keep what was read, go on with the next shard

            yield from wds.tarfile_to_samples(handler=on_error)(iter([{"url": url}]))
            if errors:
                skips.skip("truncated_shard", url, f"{type(errors[0]).__name__}: {errors[0].args[0]}")

    def _samples(self, shards: list[str], skips: SkipCounter, transform: bool = True) -> Iterator[Sample]:
        """Decoded, filtered samples of the given shards, in file order; augmented unless ``transform`` is False."""
        for raw in self._raw_samples(shards, skips):
            if self.key_filter is not None and not self.key_filter(raw["__key__"]):
                continue
            min_side = getattr(self.transform, "min_side", None)
            sample = self.decode(
                raw, skips, min_aspect_ratio=self.aspect[0], max_aspect_ratio=self.aspect[1], min_side=min_side
            )
            if sample is not None:
                yield self._transformed(sample) if transform else sample

    def _transformed(self, sample: Sample) -> Sample:
        if sample.image is not None:  # pre-tokenized samples were cropped when tokenized
            sample.image = self.transform(sample.image)
        return sample

    def _repeat(self, shards: list[str], skips: SkipCounter) -> Iterator[Sample]:
        """Pass over the shards again and again; stop if a whole pass yields nothing (all bad)."""
        while True:
            produced = 0
            for sample in self._samples(shards, skips):
                produced += 1
                yield sample
            if produced == 0:
                log.error("shards %s yielded no valid sample in a whole pass; stopping this worker", shards)
                return

    def _sample_split(self, samples: Iterator[Sample], worker: int, num_workers: int) -> Iterator[Sample]:
        """This worker's share of a stream every worker of every rank reads whole (``split_by="sample"``).

        The stream is cut into rounds of W samples; sample ``rank`` of round j goes to this rank, and to its
        worker j mod K. A sample is released only once its round is complete, so the final, incomplete
        round is left out on every rank alike.
        """
        pending: Sample | None = None
        for i, sample in enumerate(samples):
            round_, slot = divmod(i, self.world_size)
            if slot == self.rank and round_ % num_workers == worker:
                pending = self._transformed(sample)  # only this reader's share is resized
            if slot == self.world_size - 1 and pending is not None:
                yield pending
                pending = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield batches (see ``collate``) from this worker's shards."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.worker_shards(worker, num_workers)
        if self.split_by == "sample" and (self.rank, worker) != (0, 0):
            skips: SkipCounter = _UncountedSkips()  # every reader sees every skip: rank 0's worker 0 counts them
        else:
            skips = SkipCounter(sink=self._skips[worker % _MAX_WORKERS])
        if self.split_by == "sample":
            every = self._samples(shards, skips, transform=False)  # decoded, so all readers agree on validity
            samples: Iterator[Sample] = self._sample_split(every, worker, num_workers)
        elif self.samples_per_epoch is None:
            samples = self._samples(shards, skips)
        else:
            per_worker = self.samples_per_epoch // self.world_size // num_workers
            per_worker += int(worker < (self.samples_per_epoch // self.world_size) % num_workers)
            samples = itertools.islice(self._repeat(shards, skips), per_worker)
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(hash((self.seed, int(self._epoch), self.rank, worker)))
            samples = wds.filters._shuffle(samples, self.shuffle_buffer, min(100, self.shuffle_buffer), rng)
        batch: list[Sample] = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch:
            yield collate(batch)


class EpochDataLoader(DataLoader):
    """A ``DataLoader`` that advances its ``ShardDataset``'s epoch each time it is iterated.

    Lightning calls ``set_epoch`` only on samplers, which an iterable dataset does not have; workers are
    started by ``iter()``, so setting the epoch just before is what reshuffles the shard order.
    """

    def __init__(self, dataset: ShardDataset, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self._iterations = 0

    def __iter__(self):
        self.dataset.set_epoch(self._iterations)
        self._iterations += 1
        return super().__iter__()
