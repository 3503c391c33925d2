"""The entry point: LightningCLI subcommands, help, printed configs, and our own subcommands."""

import subprocess
import sys

import pytest
import yaml

from lit_dalle.cli import EXTRA_COMMANDS, main

TINY_DATA = [
    "--data.resolution=32", "--data.batch_size=4", "--data.num_workers=0",
    "--data.embedded.train_samples=16", "--data.embedded.val_samples=8", "--data.embedded.heldout_samples=8",
]  # fmt: skip


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert all(name in out for name in ["fit", "validate", "test", "predict", *EXTRA_COMMANDS])


def test_fit_help_lists_the_data_module_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    for arg in [
        "--data.train_shards",
        "--data.val_fraction",
        "--data.augment {dvae,prior,center}",
        "--data.embedded.train_samples",
        "--data.min_aspect_ratio",
    ]:
        assert arg in out
    assert "training shards: a path, brace pattern" in out  # the docstring became the help


def test_short_class_names_and_print_config(capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--model=tiny_model.TinyModel",
                "--data=TextImageDataModule",
                "--data.batch_size=3",
                "--print_config",
            ]
        )
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["class_path"] == "lit_dalle.TextImageDataModule"
    assert config["data"]["init_args"]["batch_size"] == 3 and config["model"]["init_args"]["lr"] == 0.1


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
def test_subcommands_run_on_the_embedded_data(subcommand, tmp_path):
    cli = main(
        [
            subcommand,
            "--model=tiny_model.TinyModel",
            *TINY_DATA,
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.trainer.state.finished


def test_python_dash_m_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "lit_dalle", "--help"], capture_output=True, text=True, check=True)
    assert "usage: python -m lit_dalle" in out.stdout
