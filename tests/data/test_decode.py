"""Bad samples are skipped and counted per reason; a truncated shard does not stop the stream."""

import io
from pathlib import Path

import pytest
import torch
from conftest import good_record, image_bytes
from PIL import Image

from lit_dalle.data.augment import CenterResize
from lit_dalle.data.dataset import ShardDataset
from lit_dalle.data.decode import SkipCounter, decode_sample, normalize_caption


def _bad_records():
    png = image_bytes()
    jpg = image_bytes(fmt="JPEG")
    return {
        "undecodable_image": [
            {"__key__": "garbage", "png": b"not an image at all", "txt": "x"},
            {"__key__": "truncated", "jpg": jpg[: len(jpg) // 2], "txt": "x"},
        ],
        "empty_caption": [
            {"__key__": "empty", "png": png, "txt": ""},
            {"__key__": "blank", "png": png, "txt": " \n\t "},
        ],
        "non_utf8_caption": [{"__key__": "latin1", "png": png, "txt": "caf\xe9".encode("latin-1")}],
        "missing_caption": [{"__key__": "nocap", "png": png}],
        "missing_image": [{"__key__": "noimg", "txt": "x"}],
        "aspect_ratio": [
            {"__key__": "wide", "png": image_bytes(width=90, height=40), "txt": "x"},
            {"__key__": "tall", "png": image_bytes(width=20, height=41), "txt": "x"},
        ],
    }


def _stream(shards, **kwargs):
    ds = ShardDataset(shards, CenterResize(16), batch_size=4, shuffle=False, **kwargs)
    keys = [key for batch in ds for key in batch["key"]]
    return keys, ds.skip_counts()


def test_each_bad_sample_is_skipped_and_counted(make_shards):
    bad = _bad_records()
    good = [good_record(f"good{i}", fmt) for i, fmt in enumerate(["png", "jpg", "jpeg", "webp"] * 2)]
    records = [r for group in bad.values() for r in group]
    interleaved = [x for pair in zip(good, records) for x in pair] + records[len(good) :]
    keys, skipped = _stream(make_shards(interleaved, per_shard=5))
    assert sorted(keys) == sorted(r["__key__"] for r in good)
    assert skipped == {reason: len(group) for reason, group in bad.items()}


def test_aspect_ratio_bounds_are_configurable(make_shards):
    shards = make_shards([{"__key__": "wide", "png": image_bytes(width=90, height=40), "txt": "x"}])
    assert _stream(shards)[0] == []
    assert _stream(shards, max_aspect_ratio=3.0)[0] == ["wide"]


def test_truncated_shard_is_reported_and_the_rest_streams(make_shards):
    shards = make_shards([good_record(f"k{i:02d}", seed=i) for i in range(20)], per_shard=10)
    data = Path(shards[0]).read_bytes()
    Path(shards[0]).write_bytes(data[: int(len(data) * 0.6)])  # cut mid-member
    keys, skipped = _stream(shards)
    assert skipped.get("truncated_shard") == 1
    assert [k for k in keys if k >= "k10"] == [f"k{i:02d}" for i in range(10, 20)]  # the next shard is whole
    assert 0 < len([k for k in keys if k < "k10"]) < 10  # what came before the cut still streamed


def test_captions_are_lowercased_and_whitespace_collapsed():
    assert normalize_caption("  A  Red\nCIRCLE ") == "a red circle"
    counter = SkipCounter()
    sample = decode_sample(good_record("k", caption="A Big DOG"), counter)
    assert sample is not None and sample.caption == "a big dog" and sample.image.shape == (3, 40, 48)


def test_warnings_are_rate_limited(caplog):
    counter = SkipCounter(warn_every_s=3600)
    with caplog.at_level("WARNING", logger="lit_dalle.data.decode"):
        for _ in range(50):
            counter.skip("empty_caption", "shard:key")
        counter.skip("aspect_ratio", "shard:key")
    assert len(caplog.records) == 2  # one per reason, not one per sample
    assert counter.counts == {"empty_caption": 50, "aspect_ratio": 1}


@pytest.mark.parametrize("meta", [b'{"a": 1}', b"{broken", None])
def test_optional_json_metadata(meta):
    record = good_record("k")
    if meta is not None:
        record["json"] = meta
    sample = decode_sample(record, SkipCounter())
    assert sample is not None and sample.meta == ({"a": 1} if meta == b'{"a": 1}' else None)


def test_large_jpegs_decode_at_reduced_scale_but_never_below_what_the_recipe_needs():
    from lit_dalle.data.augment import resize_square
    from lit_dalle.data.decode import decode_raw_image

    y, x = torch.meshgrid(torch.arange(512), torch.arange(512), indexing="ij")
    smooth = torch.stack([x // 2, y // 2, (x + y) // 4]).to(torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(smooth.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=95)
    full, reduced = decode_raw_image(buf.getvalue()), decode_raw_image(buf.getvalue(), min_side=96)
    assert full.shape == (3, 512, 512) and reduced.shape == (3, 128, 128)  # 1/4 DCT scale: 128 >= 96
    diff = (resize_square(full, 128).float() - reduced.float()).abs().mean()
    assert diff < 2.0  # the same picture, within JPEG noise
    png = io.BytesIO()
    Image.fromarray(smooth.permute(1, 2, 0).numpy()).save(png, "PNG")
    assert decode_raw_image(png.getvalue(), min_side=96).shape == (3, 512, 512)  # only JPEG has DCT scaling
