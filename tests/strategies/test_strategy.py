"""ShardedPowerSGD on 4 real processes (2 simulated nodes x 2 devices, gloo), against a single process.

One launch of ``tests/scripts/shard_powersgd_runs.py`` runs every multi-process fit (module fixture); each test
checks one property of its results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import good_record
from strategies.tiny_lm import TinyLM, full_state

from lit_dalle.data.shards import write_shards

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the 4-process script once; per-rank JSON results plus rank 0's full parameter tensors."""
    out = tmp_path_factory.mktemp("shard_powersgd")
    shard_dir = write_shards([good_record(f"k{i:03d}", seed=i) for i in range(32)], out / "shards", max_count=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(SCRIPTS / "shard_powersgd_runs.py"), str(out), str(Path(shard_dir[0]).parent)]
    proc = subprocess.run(cmd, timeout=300, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    tensors = {name: torch.load(out / f"{name}.pt") for name in ("dense", "full")}
    return {"ranks": ranks, **tensors}


def single_process(steps: int, **model_args: Any) -> TinyLM:
    """The reference: one process reading the rows of all 4 ranks (batch 4 x 2)."""
    torch.manual_seed(0)
    model = TinyLM(batch_size=8, **model_args)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model)
    return model


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_sharded_run_equals_a_single_process(runs):
    reference = full_state(single_process(3))
    assert max_diff(runs["dense"], reference) < 1e-5
    assert max_diff(runs["dense"], {k: v * 0 for k, v in reference.items()}) > 0.1  # the comparison has teeth
    # the mean of the 4 ranks' losses is the single process's loss at every step
    losses = torch.tensor([r["dense"]["losses"] for r in runs["ranks"]]).mean(0)
    assert torch.allclose(losses, torch.tensor(single_process(3).losses), atol=1e-5)


def test_full_rank_powersgd_equals_uncompressed(runs):
    assert runs["ranks"][0]["full"]["compressed"] == 8  # every weight matrix in the 4 resblocks (not the heads)
    assert max_diff(runs["full"], runs["dense"]) < 1e-5


def test_low_rank_cuts_cross_node_bytes_by_more_than_85_percent_and_the_loss_falls(runs):
    width, rank = 64, 4
    assert 1 - 5 * rank / (8 * width) > 0.85  # PAPER.md D.4's rate for these shapes
    for result in runs["ranks"]:
        dense_bytes, *compressed = result["low"]["bytes"]  # step 0 is uncompressed (start_iter=1)
        assert result["low"]["compressed"] == 8
        assert all(b == compressed[0] for b in compressed)
        assert 1 - compressed[0] / dense_bytes >= 0.85, (compressed[0], dense_bytes)
    losses = torch.tensor([r["low"]["losses"] for r in runs["ranks"]]).mean(0)  # [12]
    assert losses[-3:].mean() < losses[:3].mean() - 1.0, losses


def test_an_inf_on_one_rank_skips_the_update_on_every_rank(runs):
    for result in runs["ranks"]:
        inf = result["inf"]
        assert inf["skipped"] == [0, 1, 1]  # cumulative skips after steps 0, 1, 2
        assert inf["checksums"][1] == inf["checksums"][0]  # step 1 changed nothing ...
        assert inf["checksums"][2] != inf["checksums"][1]  # ... step 2 did
        assert inf["errors_finite"] and inf["params_finite"]


def test_resume_on_four_nodes_of_one_device_divides_the_buffer_sums(runs):
    resume = runs["ranks"][0]["resume"]
    assert (resume["start_step"], resume["end_step"]) == (12, 14)
    assert resume["buffers"] == 8
    assert resume["error_max"] > 1e-3  # non-trivial buffers ...
    assert resume["error_diff"] < 1e-6  # ... equal to the saved sum over 2 nodes, resharded, divided by 4


def test_text_image_data_module_gives_each_sample_to_one_rank(runs):
    keys = [k for result in runs["ranks"] for k in result["keys"]]
    assert len(keys) == 32 and len(set(keys)) == 32
    assert all(result["keys"] for result in runs["ranks"])
    val = [result["val_keys"] for result in runs["ranks"]]
    assert [len(keys) for keys in val] == [1, 1, 1, 1]  # one shard of 4, split by sample: no rank idle
    assert len({k for keys in val for k in keys}) == 4
