from pathlib import Path

import pytest
from conftest import good_record

from lit_dalle.data.shards import ShardSpecError, expand_shards


@pytest.fixture
def shard_dir(make_shards):
    paths = make_shards([good_record(f"k{i:03d}") for i in range(30)], per_shard=10)
    assert len(paths) == 3
    return Path(paths[0]).parent


def test_write_shards_names_and_counts(shard_dir):
    assert sorted(p.name for p in shard_dir.glob("*.tar")) == [f"shard-{i:06d}.tar" for i in range(3)]


@pytest.mark.parametrize(
    "spec",
    [
        "{dir}",
        "{dir}/",
        "{dir}/*.tar",
        "{dir}/shard-{{000000..000002}}.tar",
        ["{dir}/shard-000000.tar", "{dir}/shard-00000[12].tar"],
    ],
)
def test_expand_shards_forms(shard_dir, spec):
    spec = [s.format(dir=shard_dir) for s in spec] if isinstance(spec, list) else spec.format(dir=shard_dir)
    assert expand_shards(spec) == [str(shard_dir / f"shard-{i:06d}.tar") for i in range(3)]


def test_expand_shards_dedupes_and_keeps_order(shard_dir):
    first = str(shard_dir / "shard-000002.tar")
    assert expand_shards([first, str(shard_dir)]) == [first] + [str(shard_dir / f"shard-{i:06d}.tar") for i in (0, 1)]


@pytest.mark.parametrize("suffix", ["missing/*.tar", "missing_folder", "shard-{000000..000009}.tar", "nope.tar"])
def test_expand_shards_names_the_pattern_that_matches_nothing(shard_dir, suffix):
    pattern = f"{shard_dir}/{suffix}"
    with pytest.raises(ShardSpecError, match=r"does not exist|matches no file") as err:
        expand_shards(pattern)
    assert pattern in str(err.value)


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(ShardSpecError, match=r"holds no \.tar"):
        expand_shards(str(tmp_path))


def test_remote_urls_pass_through():
    assert expand_shards("pipe:cat /x/{0..1}.tar") == ["pipe:cat /x/0.tar", "pipe:cat /x/1.tar"]
