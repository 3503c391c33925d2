"""The caption tokenizer: training, lowercasing, dropout in training only, save / load round trips."""

import json

import pytest
from conftest import good_record

from lit_dalle.cli import main
from lit_dalle.text import TextTokenizer, read_captions

CAPTIONS = [
    f"a {s} {c} {shape} above a {c2} {shape2}"
    for s in ["small", "large"]
    for c in ["red", "green", "blue"]
    for c2 in ["yellow", "purple"]
    for shape in ["circle", "square"]
    for shape2 in ["triangle", "cross"]
] * 3


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(CAPTIONS, vocab_size=300, dropout=0.5)


def test_training_learns_merges_and_lowercases(tok):
    assert 256 < tok.vocab_size <= 300
    ids, valid = tok.encode(["A SMALL Red Circle", "a small red circle"], text_len=8)
    assert ids[0].tolist() == ids[1].tolist() and valid[0].tolist() == valid[1].tolist()
    assert valid[0].sum() < len("a small red circle")  # merged into fewer tokens than bytes
    assert tok.decode(ids, valid) == ["a small red circle"] * 2


def test_dropout_only_when_training(tok):
    text = ["a large blue square above a purple triangle"] * 64
    eval_rows = {tuple(r) for r in tok.encode(text, 32)[0].tolist()}
    train_rows = {tuple(r) for r in tok.encode(text, 32, train=True)[0].tolist()}
    assert len(eval_rows) == 1 and len(train_rows) > 5  # deterministic vs varied segmentations
    assert {tuple(r) for r in tok.encode(text, 32)[0].tolist()} == eval_rows  # dropout switched back off
    assert tok.decode(*tok.encode(text[:1], 64, train=True)) == [text[0]]  # same text either way


def test_truncation_and_padding(tok):
    ids, valid = tok.encode(["a red circle", ""], text_len=2)
    assert valid.tolist() == [[True, True], [False, False]] and ids[1].tolist() == [0, 0]


def test_save_load_roundtrip_file_folder_and_string(tok, tmp_path):
    file = tok.save(tmp_path / "tok")
    assert file.name == "tokenizer.json" and json.loads(file.read_text())["model"]["dropout"] is None
    for loaded in [
        TextTokenizer.load(file),
        TextTokenizer.load(tmp_path / "tok"),
        TextTokenizer.from_str(tok.to_str()),
    ]:
        assert loaded.encode(CAPTIONS[:5], 16)[0].tolist() == tok.encode(CAPTIONS[:5], 16)[0].tolist()
    with pytest.raises(FileNotFoundError, match="train-tokenizer"):
        TextTokenizer.load(tmp_path / "missing")


def test_a_hugging_face_tokenizer_folder_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    base = TextTokenizer.train(CAPTIONS, vocab_size=280)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=base.tokenizer)
    hf.save_pretrained(tmp_path / "hf")
    loaded = TextTokenizer.load(tmp_path / "hf")
    assert loaded.encode(["a red circle"], 8)[0].tolist() == base.encode(["a red circle"], 8)[0].tolist()


def test_train_tokenizer_subcommand_reads_shards(make_shards, tmp_path, capsys):
    shards = make_shards([good_record(f"k{i}", caption=c) for i, c in enumerate(CAPTIONS)], per_shard=50)
    assert len(list(read_captions(shards))) == len(CAPTIONS)
    main(["train-tokenizer", "--out", str(tmp_path / "t.json"), "--shards", json.dumps(shards), "--vocab-size", "290"])
    assert '"vocab_size"' in capsys.readouterr().out
    assert 256 < TextTokenizer.load(tmp_path / "t.json").vocab_size <= 290
