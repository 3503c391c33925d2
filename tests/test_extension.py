"""A project outside the package subclasses DVAE, Prior and the data module, adds a mask kind and a
callback, and runs through `python -m lit_dalle fit --config` with class_path pointing at its classes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from test_configs import save_matching_dvae

EXTERNAL = Path(__file__).resolve().parent / "external"
DATA = {"class_path": "myproject.TaggedData",
        "init_args": {"resolution": 32, "batch_size": 4, "num_workers": 1,
                      "embedded": {"train_samples": 16, "val_samples": 8, "heldout_samples": 8}}}  # fmt: skip


def run(config: dict, tmp_path: Path) -> dict:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(EXTERNAL)}
    subprocess.run([sys.executable, "-m", "lit_dalle", "fit", "--config", str(path), "--trainer.fast_dev_run=true",
                    f"--trainer.default_root_dir={tmp_path}"], check=True, env=env, cwd=tmp_path,
                   capture_output=True)  # fmt: skip
    return json.loads((tmp_path / "seen.json").read_text())


def callbacks(tmp_path):
    return [{"class_path": "myproject.Recorder", "init_args": {"path": str(tmp_path / "seen.json")}}]


def test_external_prior_mask_kind_data_and_callback(tmp_path):
    config = {
        "trainer": {"accelerator": "cpu", "callbacks": callbacks(tmp_path)},
        "model": {"class_path": "myproject.MyPrior", "init_args": {
            "dvae": save_matching_dvae(tmp_path / "dvae.ckpt", 64), "text_vocab": 300, "text_len": 12,
            "image_vocab": 64, "depth": 2, "width": 32, "heads": 2, "mask_schedule": ["recent", "row"],
            "conv_kernel": 3}},
        "data": DATA,
    }  # fmt: skip
    seen = run(config, tmp_path)
    assert seen["module"] == "MyPrior" and seen["network"] == "HalfDepthTransformer"
    assert seen["mask_kinds"] == ["recent", "row"]
    assert seen["captions"] and all(c.startswith("tagged: ") for c in seen["captions"])  # ran in a worker


def test_external_dvae(tmp_path):
    config = {
        "trainer": {"accelerator": "cpu", "callbacks": callbacks(tmp_path)},
        "model": {"class_path": "myproject.MyDVAE", "init_args": {"vocab_size": 32, "n_hid": 8, "n_blk_per_group": 1,
                                                                   "n_init": 8}},
        "data": DATA,
    }  # fmt: skip
    assert run(config, tmp_path)["module"] == "MyDVAE"
