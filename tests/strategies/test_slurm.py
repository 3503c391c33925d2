"""Lightning's SLURM support with ShardedPowerSGD: ranks from SLURM variables, SIGUSR1 -> checkpoint + requeue."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import lightning_utilities.core.rank_zero as utilities_rank_zero
import pytest
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero

from lit_dalle.plugins import ShardedPowerSGD

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_requeue.py"


def slurm_env(procid: int, localid: int, nodeid: int, ntasks: int, per_node: int) -> dict[str, str]:
    """What srun sets for one task (a subset: the variables Lightning reads)."""
    return {"SLURM_NTASKS": str(ntasks), "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid), "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "prior", "SLURM_NODELIST": "127.0.0.1"}  # fmt: skip


@pytest.mark.parametrize("strategy", ["shard_powersgd", "instance"])
def test_ranks_world_size_and_node_rank_come_from_slurm(monkeypatch, strategy):
    for name in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    for module in (rank_zero, utilities_rank_zero):  # the Trainer sets the process-wide rank to 3: restore it after
        monkeypatch.setattr(module.rank_zero_only, "rank", getattr(module.rank_zero_only, "rank", 0))
    for name, value in slurm_env(procid=3, localid=1, nodeid=1, ntasks=4, per_node=2).items():
        monkeypatch.setenv(name, value)
    chosen = ShardedPowerSGD(rank=896) if strategy == "instance" else strategy
    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy=chosen, logger=False)
    assert isinstance(trainer.strategy, ShardedPowerSGD)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (3, 1, 1, 4)
    assert trainer.strategy.layout == (2, 2)  # (nodes, devices per node) of the 2-D mesh


def test_sigusr1_saves_an_hpc_checkpoint_requeues_and_the_requeued_job_resumes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    with socket.socket() as s:  # a free port for the single-process gloo group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    env.update(slurm_env(0, 0, 0, ntasks=1, per_node=1), PATH=f"{bin_dir}:{env['PATH']}", MASTER_PORT=str(port),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")  # fmt: skip
    for mode in ("signal", "resume"):
        proc = subprocess.run([sys.executable, str(SCRIPT), mode, str(tmp_path)], env=env, timeout=120,
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        if mode == "signal":
            assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
            assert (tmp_path / "hpc_ckpt_1.ckpt").is_dir()  # a distributed checkpoint
    signalled = json.loads((tmp_path / "signal.json").read_text())
    resumed = json.loads((tmp_path / "resume.json").read_text())
    assert signalled["cluster"] == resumed["cluster"] == "SLURMEnvironment"
    assert (signalled["start"], signalled["signal"], signalled["end"]) == (0, 3, 5)
    assert (resumed["start"], resumed["end"]) == (3, 7)  # continues at the saved global step
