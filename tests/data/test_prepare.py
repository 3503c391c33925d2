"""`python -m lit_dalle prepare`: a folder of images with .txt captions becomes shards, once."""

import json
from pathlib import Path

import pytest
from conftest import image_bytes

from lit_dalle.cli import main
from lit_dalle.data.augment import CenterResize
from lit_dalle.data.dataset import ShardDataset
from lit_dalle.data.shards import expand_shards


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i, (name, fmt) in enumerate(
        [("a.jpg", "JPEG"), ("b.png", "PNG"), ("sub/c.webp", "WEBP"), ("sub/d.v2.jpeg", "JPEG")]
    ):
        (src / name).write_bytes(image_bytes(fmt=fmt, seed=i))
        (src / name).with_suffix(".txt").write_text(f"Caption {i}")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (src / "broken.txt").write_text("never read")
    (src / "orphan.png").write_bytes(image_bytes())
    return src


def _read(out):
    ds = ShardDataset(expand_shards(str(out)), CenterResize(8), batch_size=100, shuffle=False)
    return sorted((k, c) for b in ds for k, c in zip(b["key"], b["caption"]))


def test_prepare_writes_readable_shards_and_reports_bad_files(folder, tmp_path, capsys):
    out = tmp_path / "out"
    manifest = main(["prepare", "--from-folder", str(folder), "--out", str(out), "--samples-per-shard", "3"])
    assert manifest["written"] == 4 and len(manifest["shards"]) == 2
    assert manifest["unreadable"] == [str(folder / "broken.png")] and manifest["no_caption"] == [
        str(folder / "orphan.png")
    ]
    assert _read(out) == [("a", "caption 0"), ("b", "caption 1"), ("sub_c", "caption 2"), ("sub_d_v2", "caption 3")]
    assert "wrote 4 samples in 2 shards" in capsys.readouterr().out


def test_rerunning_does_not_duplicate(folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prepare", f"--from-folder={folder}", f"--out={out}"]
    main(args)
    main(args)
    assert "up to date" in capsys.readouterr().out
    (folder / "e.png").write_bytes(image_bytes(seed=9))
    (folder / "e.txt").write_text("new")
    main(args)  # changed source: rewritten whole, old shards replaced
    assert [k for k, _ in _read(out)] == ["a", "b", "e", "sub_c", "sub_d_v2"]
    assert json.loads((out / "manifest.json").read_text())["written"] == 5
    assert not [p for p in Path(out).iterdir() if p.name.startswith(".prepare")]


def test_prepare_errors_name_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="--from-folder"):
        main(["prepare", "--from-folder", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no image with a same-stem \.txt"):
        main(["prepare", "--from-folder", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
