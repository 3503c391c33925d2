"""Kill a Prior `fit` with SIGKILL midway; `fit --ckpt_path last` resumes with every piece of state restored."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from test_configs import ROOT, save_matching_dvae

from lit_dalle.cli import main


class ResumeProbe(L.Callback):
    """Captures what the trainer holds when training (re)starts."""

    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step
        self.optimizer = {k: v.clone() for k, v in trainer.optimizers[0].state_dict()["state"][0].items()}
        self.tokenizer = pl_module.text_tokenizer.to_str()
        ema = next(c for c in trainer.callbacks if type(c).__name__ == "EMA")
        self.ema = {k: v.clone() for k, v in ema.ema.items()}
        self.plateau = next(c for c in trainer.callbacks if type(c).__name__ == "WarmupHalveOnPlateau").state_dict()


def tiny_prior_config(tmp_path: Path) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "prior.yaml").read_text())
    config["trainer"].update(max_steps=100_000, max_time=None, val_check_interval=None, limit_val_batches=0,
                             default_root_dir=str(tmp_path / "run"), enable_progress_bar=False)  # fmt: skip
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"].update(dirpath=str(tmp_path / "ckpts"), every_n_train_steps=4)
    config["model"]["init_args"].update(
        dvae=save_matching_dvae(tmp_path / "dvae.ckpt", 512), depth=2, width=32, heads=2, text_vocab=300, text_len=12
    )
    config["data"]["init_args"].update(resolution=32, batch_size=8, num_workers=0)
    config["data"]["init_args"]["embedded"] = {"train_samples": 64, "val_samples": 8, "heldout_samples": 8}
    path = tmp_path / "tiny_prior.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_sigkill_then_resume_restores_step_optimizer_tokenizer_and_ema(tmp_path):
    config = tiny_prior_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen([sys.executable, "-m", "lit_dalle", "fit", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    last = tmp_path / "ckpts" / "last.ckpt"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if last.is_file() and torch.load(last, map_location="cpu", weights_only=False)["global_step"] >= 12:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)  # no chance to save anything more
        proc.wait(timeout=30)
    finally:
        proc.kill()
    saved = torch.load(last, map_location="cpu", weights_only=False)
    step = saved["global_step"]
    cli = main(["fit", "--config", str(config), "--ckpt_path", "last", f"--trainer.max_steps={step + 3}",
                "--trainer.callbacks+=test_resume.ResumeProbe"])  # fmt: skip
    probe = next(c for c in cli.trainer.callbacks if isinstance(c, ResumeProbe))
    assert probe.step == step and cli.trainer.global_step == step + 3
    for name, value in saved["optimizer_states"][0]["state"][0].items():
        assert torch.equal(probe.optimizer[name], value)
    assert probe.tokenizer == saved["lit_dalle_prior"]["tokenizer"]  # restored, not retrained
    ema_state = next(v for k, v in saved["callbacks"].items() if k.startswith("EMA"))
    assert probe.ema.keys() == ema_state["ema"].keys()
    assert all(torch.equal(probe.ema[k], ema_state["ema"][k]) for k in probe.ema)
    plateau = next(v for k, v in saved["callbacks"].items() if k.startswith("WarmupHalveOnPlateau"))
    assert probe.plateau == pytest.approx(plateau, nan_ok=True)
