"""Train TinyLM with ShardedPowerSGD under (simulated) SLURM; optionally send SIGUSR1 to itself at step 3.

Usage: python slurm_requeue.py {signal,resume} OUT_DIR
Writes OUT_DIR/{mode}.json: the global step at train start, at the signal, and at the end. Lightning's SLURM
handler must save ``hpc_ckpt_1.ckpt`` and call ``scontrol requeue $SLURM_JOB_ID``; ``resume`` starts from it.
"""

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from strategies.tiny_lm import TinyLM

from lit_dalle.plugins import ShardedPowerSGD

torch.set_num_threads(1)


class Steps(L.Callback):
    def __init__(self, send_at: int | None) -> None:
        self.send_at, self.record = send_at, {}

    def on_train_start(self, trainer, pl_module):
        self.record["start"] = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.send_at:
            self.record["signal"] = trainer.global_step
            os.kill(os.getpid(), signal.SIGUSR1)  # what `#SBATCH --signal=SIGUSR1@90` does before the time limit


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    steps = Steps(3 if mode == "signal" else None)
    trainer = L.Trainer(accelerator="cpu", devices=1, num_nodes=1, strategy=ShardedPowerSGD(timeout_s=30),
                        max_steps=5 if mode == "signal" else 7, default_root_dir=out, callbacks=[steps], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    torch.manual_seed(0)
    trainer.fit(TinyLM())  # no ckpt_path: under SLURM, Lightning resumes from the newest hpc checkpoint itself
    steps.record["end"] = trainer.global_step
    steps.record["cluster"] = type(trainer._accelerator_connector.cluster_environment).__name__
    (out / f"{mode}.json").write_text(json.dumps(steps.record))
