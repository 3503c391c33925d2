"""Every shipped config runs with fast_dev_run; the paper presets have the paper's parameter counts."""

from pathlib import Path

import pytest
import torch
import yaml

from lit_dalle.cli import main

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = sorted(p for p in (ROOT / "configs").glob("*.yaml"))
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))


def save_matching_dvae(path: Path, vocab: int) -> str:
    """A small random DVAE with the codebook a config expects (the real one takes minutes to train)."""
    import lightning as L

    from lit_dalle.dvae import DVAE

    dvae = DVAE(vocab_size=vocab, n_hid=8, group_count=4, n_blk_per_group=1, n_init=8)
    torch.save({"state_dict": dvae.state_dict(), "hyper_parameters": dict(dvae.hparams),
                "pytorch-lightning_version": L.__version__}, path)  # fmt: skip
    return str(path)


def test_there_are_configs():
    assert {p.name for p in RUNNABLE} >= {"dvae.yaml", "prior.yaml"}
    assert {p.name for p in PAPER} >= {"dvae.yaml", "prior.yaml"}


@pytest.mark.parametrize("config", RUNNABLE, ids=lambda p: p.name)
def test_every_config_runs_with_fast_dev_run(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs write to relative paths (runs/...): keep them out of the repo
    args = ["fit", "--config", str(config), "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"]
    model_args = yaml.safe_load(config.read_text())["model"]["init_args"]
    if "dvae" in model_args:  # a Prior: give it a DVAE with the codebook it expects
        args.append(f"--model.dvae={save_matching_dvae(tmp_path / 'dvae.ckpt', model_args['image_vocab'])}")
    cli = main(args)
    assert cli.trainer.state.finished and cli.trainer.global_step == 1


def _build_on_meta(config: Path) -> torch.nn.Module:
    spec = yaml.safe_load(config.read_text())["model"]
    module, name = spec["class_path"].rsplit(".", 1)
    cls = getattr(__import__(module, fromlist=[name]), name)
    init_args = {k: v for k, v in spec["init_args"].items() if k != "dvae"}
    if "image_size" not in init_args and "downsample" in init_args:
        init_args["image_size"] = yaml.safe_load(config.read_text())["data"]["init_args"]["resolution"]
    with torch.device("meta"):
        return cls(**init_args)


def test_paper_dvae_has_the_paper_parameter_counts():
    dvae = _build_on_meta(ROOT / "configs" / "paper" / "dvae.yaml")
    encoder = sum(p.numel() for p in dvae.encoder.parameters())
    decoder = sum(p.numel() for p in dvae.decoder.parameters())
    assert encoder == pytest.approx(53.8e6, rel=0.005) and decoder == pytest.approx(43.8e6, rel=0.005)


def test_paper_prior_has_about_12_billion_parameters():
    prior = _build_on_meta(ROOT / "configs" / "paper" / "prior.yaml")
    total = sum(p.numel() for p in prior.parameters())
    assert 12.0e9 < total < 12.4e9  # PAPER.md B.3: 12 d^2 x 64 = 12.09 B in the layers, plus embeddings and heads
    assert prior.grid == 32 and prior.config.seq_len == 256 + 1024 and len(prior.transformer.blocks) == 64
