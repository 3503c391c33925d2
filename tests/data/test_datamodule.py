"""TextImageDataModule: settings checked up front, the embedded default, skip metrics in TensorBoard."""

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import good_record, image_bytes
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_model import TinyModel

from lit_dalle.data import EmbeddedShapes, ShardSpecError, TextImageDataModule
from lit_dalle.data.embedded import dataset_dir

TINY = EmbeddedShapes(train_samples=48, val_samples=16, heldout_samples=16, samples_per_shard=16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"resolution": -8}, "resolution=-8"),
        ({"num_workers": -1}, "num_workers=-1"),
        ({"val_fraction": 1.0}, r"val_fraction=1.0 must be in \[0, 1\)"),
        ({"min_aspect_ratio": 3.0}, "min_aspect_ratio <= max_aspect_ratio"),
        ({"samples_per_epoch": 0}, "samples_per_epoch=0"),
    ],
)
def test_bad_settings_fail_at_construction_naming_the_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextImageDataModule(**kwargs)


def test_missing_shards_fail_before_training_naming_the_pattern(tmp_path):
    pattern = str(tmp_path / "nowhere" / "*.tar")
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ShardSpecError, match="nowhere"):
        trainer.fit(TinyModel(), TextImageDataModule(train_shards=pattern))
    assert trainer.global_step == 0


def test_embedded_dataset_is_generated_into_the_cache_and_used_for_every_split():
    data = TextImageDataModule(resolution=32, batch_size=8, num_workers=0, embedded=TINY)
    data.prepare_data()
    data.setup("fit")
    root = dataset_dir(data.embedded)
    assert root.is_relative_to(os.environ["LIT_DALLE_CACHE"]) and (root / "done.json").is_file()
    assert data.embedded.resolution == 32  # renders at the data module's resolution
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert all(c == c.lower() and c for c in batch["caption"]) and batch["meta"][0]["objects"]
    counts = {
        split: sum(len(b["key"]) for b in loader)
        for split, loader in [
            ("train", data.train_dataloader()),
            ("val", data.val_dataloader()),
            ("test", data.test_dataloader()),
        ]
    }
    assert counts == {"train": 48, "val": 16, "test": 16}
    assert all(k.startswith("heldout") for b in data.test_dataloader() for k in b["key"])
    mtime = (root / "done.json").stat().st_mtime_ns
    TextImageDataModule(resolution=32, embedded=TINY).prepare_data()  # reused, not regenerated
    assert (root / "done.json").stat().st_mtime_ns == mtime


def test_val_fraction_splits_training_shards_by_key(make_shards):
    shards = make_shards([good_record(f"k{i:03d}", seed=i) for i in range(60)], per_shard=20)
    data = TextImageDataModule(train_shards=shards, val_fraction=0.3, resolution=16, batch_size=7, num_workers=0)
    data.setup("fit")
    train = {k for b in data.train_dataloader() for k in b["key"]}
    val = {k for b in data.val_dataloader() for k in b["key"]}
    assert train.isdisjoint(val) and len(train | val) == 60 and 8 <= len(val) <= 30


def test_no_validation_data_means_no_validation_loop(make_shards):
    data = TextImageDataModule(train_shards=make_shards([good_record("a")]), num_workers=0)
    data.setup("fit")
    assert data.val_dataloader() == []


def test_images_become_float_on_the_device_and_skips_reach_tensorboard(make_shards, tmp_path):
    good = [good_record(f"g{i:02d}", seed=i) for i in range(16)]
    bad = [{"__key__": f"w{i}", "png": image_bytes(width=120, height=40), "txt": "wide"} for i in range(3)]
    bad += [{"__key__": "e", "png": image_bytes(), "txt": "  "}]
    data = TextImageDataModule(
        train_shards=make_shards(good + bad, per_shard=5), resolution=16, batch_size=4, num_workers=2
    )
    logger = L.pytorch.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    trainer = L.Trainer(
        max_epochs=1,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = TinyModel()
    trainer.fit(model, data)
    assert sorted(model.seen) == sorted(r["__key__"] for r in good)  # TinyModel asserts float [0, 1] images
    events = EventAccumulator(str(Path(logger.log_dir))).Reload()
    last = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    assert last["data/skipped_aspect_ratio"] == 3 and last["data/skipped_empty_caption"] == 1
    assert last["data/skipped_total"] == 4 and last["data/skipped_undecodable_image"] == 0


def test_validation_shards_are_split_by_sample_across_ranks(make_shards):
    # One validation shard, two ranks: both validate (none idle), on equal batches, disjoint samples.
    train = make_shards([good_record(f"t{i}") for i in range(8)], name="train")
    val = make_shards([good_record(f"v{i:02d}") for i in range(9)], name="val", per_shard=9)
    per_rank = []
    for rank in (0, 1):
        data = TextImageDataModule(
            train_shards=train, val_shards=val, resolution=16, batch_size=4, val_batch_size=2, num_workers=0
        )
        data._rank_world = lambda rank=rank: (rank, 2)
        data.setup("fit")
        per_rank.append([b["key"] for b in data.val_dataloader()])
        assert data._datasets["val"].split_by == "sample"
    assert [len(batches) for batches in per_rank] == [2, 2]
    keys = [k for batches in per_rank for b in batches for k in b]
    assert len(keys) == len(set(keys)) == 8  # 9 samples, 2 ranks: the last, incomplete round is left out
