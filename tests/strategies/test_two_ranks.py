"""Two-process runs (tests/scripts/shard_two_ranks.py): EMA under sharding, torch's PowerSGD hook, the fp16
plugin's skipped steps under ShardedPowerSGD, and a rank that dies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from strategies.tiny_lm import TinyLM

from lit_dalle.callbacks import EMA

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "shard_two_ranks.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("two_ranks")
    proc = subprocess.run([sys.executable, str(SCRIPT), "ema", str(out)], timeout=300, env=ENV, capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {**json.loads((out / "two_ranks.json").read_text()), "ema": torch.load(out / "ema.pt")}


class Snapshot(L.Callback):
    """The EMA average after each update (EMA runs first: it is listed first)."""

    def __init__(self, ema: EMA) -> None:
        self.ema, self.history = ema, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.history.append({k: v.clone() for k, v in self.ema.ema.items()})


def test_ema_of_a_sharded_run_equals_the_single_process_ema_and_survives_a_resume(runs):
    torch.manual_seed(0)
    model, ema = TinyLM(batch_size=4), EMA(decay=0.5, copy_at_end=False)
    snapshot = Snapshot(ema)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ema, snapshot])  # fmt: skip
    trainer.fit(model)
    sharded = runs["ema"]
    assert sharded["updates"] == 5
    for step, got in ((3, sharded["at3"]), (5, sharded["at5"])):  # at5: after saving at 3 and resuming
        want = snapshot.history[step - 1]
        assert got.keys() == want.keys()
        assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-5, step
    moved = max(float((snapshot.history[4][k] - snapshot.history[2][k]).abs().max()) for k in want)
    assert moved > 1e-3  # steps 4-5 changed the average: the comparison at 5 tests the resume


def test_a_full_single_file_checkpoint_restores_ema_and_error_buffers(runs):
    full = runs["full_checkpoint"]
    assert full["is_file"] and full["buffers"] == 8 and full["error_max"] > 1e-3
    assert full["ema_diff"] < 1e-7 and full["error_diff"] < 1e-6  # the resumed run (no steps left) holds the saved


def test_ddp_with_torch_powersgd_hook_runs_on_cpu(runs):
    ddp = runs["ddp_powersgd"]
    assert ddp["iter"] == 4 and ddp["errors"] > 0  # the hook ran every step and compressed after start_iter=2
    assert ddp["replicas_agree"]
    assert all(loss == loss for loss in ddp["losses"])


def test_per_resblock_scaling_skips_with_sharded_powersgd(runs):
    fp16 = runs["fp16"]
    assert fp16["compressed"] == 8
    assert fp16["strategy_skipped"] == 1 and fp16["plugin_skipped"] == 1  # the injected inf, on every rank
    assert fp16["errors_finite"]


def test_a_rank_that_dies_fails_the_job_instead_of_hanging(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), "die", str(tmp_path)], timeout=120, env=ENV,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode != 0
    assert time.monotonic() - start < 60
