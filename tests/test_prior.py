"""The Prior LightningModule: loss on data, tokenizer life cycle, the DVAE link, pre-tokenized shards, sampling."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from lit_dalle.cli import main
from lit_dalle.data import EmbeddedShapes, TextImageDataModule
from lit_dalle.data.augment import CenterResize
from lit_dalle.data.dataset import ShardDataset
from lit_dalle.data.shards import expand_shards
from lit_dalle.dvae import DVAE
from lit_dalle.prior import Prior

TINY_DATA = EmbeddedShapes(train_samples=64, val_samples=16, heldout_samples=16, samples_per_shard=32)
TINY_PRIOR = dict(text_vocab=300, text_len=12, image_size=32, image_vocab=64, downsample=8, depth=2, width=32,
                  heads=2, bpe_dropout=0.1)  # fmt: skip


def save_dvae(path: Path, seed: int = 0, vocab: int = 64) -> str:
    torch.manual_seed(seed)
    dvae = DVAE(vocab_size=vocab, n_hid=8, group_count=4, n_blk_per_group=1, n_init=8)
    torch.save({"state_dict": dvae.state_dict(), "hyper_parameters": dict(dvae.hparams),
                "pytorch-lightning_version": L.__version__}, path)  # fmt: skip
    return str(path)


@pytest.fixture(scope="module")
def dvae_ckpt(tmp_path_factory):
    return save_dvae(tmp_path_factory.mktemp("dvae") / "dvae.ckpt")


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(model, tmp_path, data=None, steps=30, **trainer_kwargs):
    data = data or TextImageDataModule(resolution=32, batch_size=16, num_workers=0, augment="prior", embedded=TINY_DATA)
    recorder = LossRecorder()
    trainer = L.Trainer(max_steps=steps, default_root_dir=tmp_path, enable_progress_bar=False, callbacks=[recorder],
                        enable_model_summary=False, limit_val_batches=1, **trainer_kwargs)  # fmt: skip
    trainer.fit(model, data)
    return trainer, recorder.losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dvae_ckpt):
    tmp = tmp_path_factory.mktemp("prior")
    model = Prior(dvae=dvae_ckpt, lr=3e-3, **TINY_PRIOR)
    trainer, losses = fit(model, tmp, steps=40)
    ckpt = tmp / "prior.ckpt"
    trainer.save_checkpoint(ckpt)
    return model, trainer, losses, ckpt


def test_loss_falls_on_data(trained):
    _, _, losses, _ = trained
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_tokenizer_is_trained_saved_beside_and_stored_in_the_checkpoint(trained, dvae_ckpt):
    model, trainer, _, ckpt = trained
    assert (Path(trainer.log_dir) / "tokenizer.json").is_file()
    assert (Path(trainer.checkpoint_callback.dirpath) / "tokenizer.json").is_file()
    assert 256 < model.text_tokenizer.vocab_size <= 300
    loaded = Prior.load_from_checkpoint(ckpt)
    captions = ["a small red circle above a large blue square"]
    assert torch.equal(loaded.encode_text(captions), model.encode_text(captions).cpu())
    assert loaded.dvae_record == model.dvae_record and loaded.dvae_record.sha256
    assert model.dvae is not None and not [k for k in model.state_dict() if "dvae" in k]  # never stored


def test_a_different_dvae_is_refused_naming_what_differs(trained, tmp_path):
    _, _, _, ckpt = trained
    other = save_dvae(tmp_path / "other.ckpt", seed=1)
    prior = Prior.load_from_checkpoint(ckpt, dvae=other)
    with pytest.raises(ValueError, match=r"not the DVAE this Prior was trained with.*sha256"):
        _ = prior.dvae


def test_dvae_settings_are_checked_before_training(tmp_path, dvae_ckpt):
    with pytest.raises(ValueError, match="codebook of 64"):
        fit(Prior(dvae=dvae_ckpt, **{**TINY_PRIOR, "image_vocab": 128}), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"configs/dvae\.yaml"):
        fit(Prior(dvae=str(tmp_path / "missing.ckpt"), **TINY_PRIOR), tmp_path)
    with pytest.raises(ValueError, match="multiple of downsample"):
        Prior(**{**TINY_PRIOR, "image_size": 36})


def test_weight_decay_skips_gains_biases_and_embeddings():
    model = Prior(**TINY_PRIOR)
    decay, no_decay = model.configure_optimizers().param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 4.5e-2 and no_decay["weight_decay"] == 0.0
    assert decayed and all(n.endswith("weight") and "norm" not in n and "embed" not in n for n in decayed)
    assert any("embed" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert model.configure_optimizers().defaults["betas"] == (0.9, 0.96)


def test_adamw8bit_is_selectable_and_steps():
    pytest.importorskip("bitsandbytes")
    model = Prior(optimizer="adamw8bit", **TINY_PRIOR)
    optimizer = model.configure_optimizers()
    assert type(optimizer).__name__ == "AdamW8bit"
    before = [p.detach().clone() for p in model.parameters()]
    text = torch.randint(0, 256, (2, 12))
    model.loss(text, torch.randint(0, 64, (2, 16)))["loss"].backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_pretokenized_shards_match_the_dvae_and_train_the_prior(tmp_path, dvae_ckpt):
    data = TextImageDataModule(resolution=32, embedded=TINY_DATA)
    data.prepare_data()
    data.setup()
    src = str(Path(data.shards["train"][0]).parent)
    out = tmp_path / "tokens"
    main(["tokenize", "--dvae", dvae_ckpt, "--out", str(out), "--resolution", "32", "--shards", json.dumps([src])])
    manifest = json.loads((out / "tokenize.json").read_text())
    assert manifest["grid"] == 4 and manifest["dvae"]["vocab_size"] == 64
    dvae = DVAE.load_from_checkpoint(dvae_ckpt).eval()
    images = next(iter(ShardDataset(expand_shards(src), CenterResize(32), 8, shuffle=False)))
    tokens = next(iter(ShardDataset(expand_shards(str(out)), CenterResize(32), 8, shuffle=False)))
    assert tokens["key"] == images["key"] and tokens["caption"] == images["caption"]
    assert torch.equal(tokens["image_tokens"], dvae.encode(images["image"].float() / 255))
    main(["tokenize", "--dvae", dvae_ckpt, "--out", str(out), "--resolution", "32", "--shards", json.dumps([src])])
    # resumable: existing shards are kept, nothing re-encoded
    token_data = TextImageDataModule(train_shards=str(out), resolution=32, batch_size=8, num_workers=0)
    _, losses = fit(Prior(dvae=dvae_ckpt, lr=3e-3, **TINY_PRIOR), tmp_path, data=token_data, steps=6)
    assert len(losses) == 6
    other = save_dvae(tmp_path / "other.ckpt", seed=3)
    with pytest.raises(ValueError, match=r"not the DVAE the pre-tokenized shards \(.*\) were made with"):
        fit(Prior(dvae=other, **TINY_PRIOR), tmp_path, data=token_data, steps=1)


def test_generate_writes_a_captioned_grid_reproducibly(trained, tmp_path):
    _, _, _, ckpt = trained
    args = ["generate", "--ckpt", str(ckpt), "--prompt", '["a red circle", "a small blue square"]',
            "--num-samples", "3", "--seed", "7"]  # fmt: skip
    main([*args, "--out", str(tmp_path / "a.png")])
    main([*args, "--out", str(tmp_path / "b.png")])
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.size == b.size and a.width >= 3 * 32 and a.height >= 2 * 32
    assert a.tobytes() == b.tobytes()  # same seed, same images


def test_generate_reranks_with_a_contrastive_checkpoint_and_keeps_the_top(trained, trained_clip, tmp_path):
    _, _, _, ckpt = trained
    args = ["generate", "--ckpt", str(ckpt), "--prompt", "a red circle", "--num-samples", "6", "--seed", "7"]
    main([*args, "--out", str(tmp_path / "all.png")])
    main([*args, "--top", "2", "--rerank", str(trained_clip), "--out", str(tmp_path / "top.png")])
    every, top = Image.open(tmp_path / "all.png"), Image.open(tmp_path / "top.png")
    assert top.height == every.height and top.width == 2 * 34 + 2 < every.width  # 2 of the 6 kept (32 px + pads)
    with pytest.raises(ValueError, match="--top 7"):
        main([*args, "--top", "7", "--out", str(tmp_path / "x.png")])
    with pytest.raises(FileNotFoundError, match="--rerank"):
        main([*args, "--rerank", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x.png")])


def test_generate_completes_an_image_from_its_first_rows(trained, tmp_path):
    _, _, _, ckpt = trained
    source = tmp_path / "source.png"
    Image.new("RGB", (40, 32), (200, 30, 30)).save(source)
    main(["generate", "--ckpt", str(ckpt), "--prompt", "a red square", "--num-samples", "2", "--out",
          str(tmp_path / "p.png"), "--prefix-image", str(source), "--prefix-rows", "2"])  # fmt: skip
    assert Image.open(tmp_path / "p.png").width >= 2 * 32
    with pytest.raises(ValueError, match="prefix-rows must be in"):
        main(["generate", "--ckpt", str(ckpt), "--prompt", "x", "--prefix-image", str(source), "--prefix-rows", "4"])


def test_sampling_depends_on_the_seed_and_temperature(trained):
    model = trained[0]
    hot = [model.generate_tokens(["a red circle"] * 4, temperature=3.0, seed=s) for s in (1, 2)]
    assert not torch.equal(hot[0], hot[1])
    greedy = [model.generate_tokens(["a red circle"] * 4, temperature=0.0, seed=s) for s in (1, 2)]
    assert torch.equal(greedy[0], greedy[1]) and (greedy[0] == greedy[0][:1]).all()


def test_generated_tokens_respect_the_image_prefix(trained):
    model = trained[0]
    prefix = torch.randint(0, 64, (2, 8))  # the first 2 rows of a 4 x 4 grid
    tokens = model.generate_tokens(["a red circle"] * 2, image_prefix=prefix, seed=0)
    assert tokens.shape == (2, 4, 4) and torch.equal(tokens.flatten(1)[:, :8], prefix)


def test_two_process_ddp_trains_one_tokenizer_and_logs_samples_on_rank_zero(dvae_ckpt, tmp_path):
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parent / "scripts" / "ddp_prior.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, str(script), dvae_ckpt, str(tmp_path)], check=True, timeout=180, env=env,
                   capture_output=True)  # fmt: skip
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["tokenizer"] == ranks[1]["tokenizer"]  # trained once on rank 0, broadcast
    assert ranks[0]["step"] == ranks[1]["step"] == 4
    assert [Path(p).name for p in ranks[0]["written"]] == ["step-0000002.png", "step-0000004.png"]
    assert ranks[1]["written"] == []
    assert (tmp_path / "tb" / "version_0" / "tokenizer.json").is_file()
