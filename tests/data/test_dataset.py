"""Splitting shards over ranks and workers, the hash validation split, fixed-length epochs, real DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import good_record

from lit_dalle.data.augment import CenterResize
from lit_dalle.data.dataset import EpochDataLoader, ShardDataset, key_fraction

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def shards(make_shards):
    return make_shards([good_record(f"k{i:03d}", seed=i % 7) for i in range(96)], per_shard=12)  # 8 shards


def _keys(shards, rank=0, world=1, workers=0, **kwargs):
    ds = ShardDataset(shards, CenterResize(8), batch_size=5, rank=rank, world_size=world, **kwargs)
    return [k for batch in EpochDataLoader(ds, num_workers=workers) for k in batch["key"]]


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2), (4, 1), (3, 2)])
def test_ranks_and_workers_partition_the_samples(shards, world, workers):
    seen = [k for rank in range(world) for k in _keys(shards, rank, world, workers)]
    assert len(seen) == len(set(seen)) == 96


def test_shard_order_reshuffles_each_epoch_but_agrees_across_ranks(shards):
    ds = [ShardDataset(shards, CenterResize(8), 4, rank=r, world_size=2) for r in (0, 1)]
    for d in ds:
        d.set_epoch(0)
    epoch0 = [d.worker_shards(0, 1) for d in ds]
    assert sorted(epoch0[0] + epoch0[1]) == sorted(shards)
    for d in ds:
        d.set_epoch(1)
    assert [d.worker_shards(0, 1) for d in ds] != epoch0


def test_hash_split_is_stable_disjoint_and_world_size_independent(shards):
    def split(keep_val, world):
        return {
            k
            for r in range(world)
            for k in _keys(shards, r, world, key_filter=lambda k: (key_fraction(k) < 0.25) == keep_val)
        }

    val, train = split(True, 1), split(False, 1)
    assert val.isdisjoint(train) and len(val | train) == 96
    assert 10 <= len(val) <= 40  # about a quarter of 96
    assert split(True, 3) == val and split(False, 2) == train
    assert key_fraction("k001") == key_fraction("k001") and 0 <= key_fraction("abc") < 1


def test_samples_per_epoch_gives_every_rank_the_same_count(make_shards):
    uneven = make_shards([good_record(f"k{i:03d}") for i in range(25)], per_shard=10)  # shards of 10, 10, 5
    counts = [len(_keys(uneven, r, 2, workers=2, samples_per_epoch=40)) for r in (0, 1)]
    assert counts == [20, 20]
    assert len(ShardDataset(uneven, CenterResize(8), 6, world_size=2, samples_per_epoch=40)) == 4


def test_all_bad_shards_do_not_loop_forever(make_shards):
    bad = make_shards([{"__key__": f"b{i}", "txt": "no image"} for i in range(5)])
    assert _keys(bad, samples_per_epoch=10) == []


@pytest.mark.parametrize(("devices", "workers", "per_epoch"), [(2, 2, None), (2, 2, 64)])
def test_ddp_two_processes_two_workers_see_each_sample_once(shards, tmp_path, devices, workers, per_epoch):
    shard_dir = str(Path(shards[0]).parent)
    args = [sys.executable, str(SCRIPTS / "ddp_keys.py"), shard_dir, str(tmp_path), str(devices), str(workers)]
    if per_epoch:
        args.append(str(per_epoch))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(args, check=True, timeout=240, env=env, capture_output=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(devices)]
    seen = [k for r in ranks for k in r["keys"]]
    if per_epoch is None:
        assert len(seen) == len(set(seen)) == 96  # every sample exactly once over 2 ranks x 2 workers
    else:
        assert len(seen) == per_epoch and ranks[0]["steps"] == ranks[1]["steps"]


@pytest.mark.parametrize(("world", "workers"), [(2, 0), (3, 2), (4, 1)])
def test_sample_split_gives_every_rank_equal_loadedfrom_uneven_shards(make_shards, world, workers):
    records = [good_record(f"k{i:03d}") for i in range(25)]
    records.insert(7, {"__key__": "bad", "png": b"not an image", "txt": "x"})  # skipped, counted once
    uneven = make_shards(records, per_shard=11)  # shards of 11, 11, 4: fewer shards than 4 ranks
    per_rank, batches, skipped = [], [], 0
    for rank in range(world):
        ds = ShardDataset(uneven, CenterResize(8), 3, rank=rank, world_size=world, shuffle=False, split_by="sample")
        loader = EpochDataLoader(ds, num_workers=workers)
        loaded = list(loader)
        assert all(tuple(b["image"].shape[-2:]) == (8, 8) for b in loaded)  # this reader's share is resized
        got = [batch["key"] for batch in loaded]
        per_rank.append([k for keys in got for k in keys])
        batches.append(len(got))
        skipped += sum(ds.skip_counts().values())
    valid = [r["__key__"] for r in records if r["__key__"] != "bad"]
    kept = len(valid) // world * world  # the last, incomplete round of `world` samples is left out
    assert [len(keys) for keys in per_rank] == [kept // world] * world
    assert len(set(batches)) == 1  # the same number of batches on every rank: sharded models need it
    seen = [k for keys in per_rank for k in keys]
    assert len(seen) == len(set(seen)) and set(seen) == set(valid[:kept])
    assert skipped == 1  # every reader meets the bad sample; only rank 0's first worker counts it


def test_split_by_is_checked():
    with pytest.raises(ValueError, match="split_by='rows'"):
        ShardDataset([], CenterResize(8), 4, split_by="rows")
    with pytest.raises(ValueError, match="samples_per_epoch"):
        ShardDataset([], CenterResize(8), 4, split_by="sample", samples_per_epoch=10)
