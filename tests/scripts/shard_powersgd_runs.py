"""Several short fits of `strategies.tiny_lm.TinyLM` with ShardedPowerSGD on 4 CPU processes (gloo).

Two simulated nodes of two devices (``devices=4, devices_per_node=2``), one launch for every run (process
start-up dominates on 2 cores). Each rank writes ``OUT/rank{r}.json``; rank 0 also writes full parameter
tensors (``*.pt``). `tests/strategies/test_strategy.py` checks the results.

Usage: python shard_powersgd_runs.py OUT_DIR SHARD_DIR
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from strategies.tiny_lm import TinyLM, full_state

from lit_dalle.data import TextImageDataModule
from lit_dalle.plugins import ShardedPowerSGD

torch.set_num_threads(1)


class Recorder(L.Callback):
    """Per step: cross-node bytes, skipped updates, a checksum of the local parameter shards."""

    def __init__(self) -> None:
        self.bytes, self.skipped, self.checksums = [], [], []
        self.start_step, self.start_errors = None, None

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step
        reducer = trainer.strategy.reducer
        self.start_errors = {reducer.names[s.index]: s.error.clone() for s in reducer.shards}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.bytes.append(trainer.strategy.reducer.last_step_bytes)
        self.skipped.append(trainer.strategy.skipped_steps)
        self.checksums.append(sum(float(p.detach().to_local().double().sum()) for p in pl_module.parameters()))


def fit(out: Path, model_args: dict, steps: int, ckpt_path=None, **strategy_args):
    """One fit of a new TinyLM(**model_args); returns (model, trainer, recorder)."""
    torch.manual_seed(0)  # the same initial weights on every rank and in the single-process reference
    model = TinyLM(**model_args)
    strategy = ShardedPowerSGD(devices_per_node=strategy_args.pop("devices_per_node", 2), timeout_s=60, **strategy_args)
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=4, strategy=strategy, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder], default_root_dir=out,
    )  # fmt: skip
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, trainer, recorder


if __name__ == "__main__":
    out, shard_dir = Path(sys.argv[1]), sys.argv[2]
    result = {}

    # A sharded run without compression, and PowerSGD at full rank: both against a single process.
    for name, args in {"dense": {"rank": None}, "full": {"rank": 64, "compress_small": True}}.items():
        model, trainer, rec = fit(out, {}, 3, **args)
        state = full_state(model)  # collective
        if trainer.global_rank == 0:
            torch.save(state, out / f"{name}.pt")
        result[name] = {"losses": model.losses, "bytes": rec.bytes, "compressed": len(trainer.strategy.reducer.shards)}

    # Low rank (2 per device) on width 64 for 12 steps, step 0 uncompressed (start_iter=1); then a checkpoint.
    model, trainer, rec = fit(out, {"width": 64}, 12, rank=4, start_iter=1)
    trainer.save_checkpoint(out / "low.ckpt")
    sums = {k: v.full_tensor() for k, v in trainer.strategy._error_sums().items()}  # collective
    if trainer.global_rank == 0:
        torch.save(sums, out / "low_sums.pt")
    result["low"] = {"losses": model.losses, "bytes": rec.bytes, "compressed": len(trainer.strategy.reducer.shards)}

    # Resume that checkpoint on 4 nodes of 1 device: the buffers are resharded, divided by 4, and training goes on.
    model, trainer, rec = fit(out, {"width": 64}, 14, ckpt_path=out / "low.ckpt", rank=4, devices_per_node=1)
    saved = torch.load(out / "low_sums.pt")  # full matrices; with one device per node the shard is the matrix
    result["resume"] = {
        "start_step": rec.start_step, "end_step": trainer.global_step, "buffers": len(rec.start_errors),
        "error_diff": max(float((e - saved[n] / 4).abs().max()) for n, e in rec.start_errors.items()),
        "error_max": max(float(e.abs().max()) for e in rec.start_errors.values()),
    }  # fmt: skip

    # An inf in rank 1's local gradient at step 1: every rank skips that update; buffers stay finite.
    model, trainer, rec = fit(out, {"inject_inf": (1, 1)}, 3, rank=4)
    errors = [s.error for s in trainer.strategy.reducer.shards]
    params = [p.detach().to_local() for p in model.parameters()]
    result["inf"] = {"skipped": rec.skipped, "checksums": rec.checksums,
                     "errors_finite": all(bool(torch.isfinite(e).all()) for e in errors),
                     "params_finite": all(bool(torch.isfinite(p).all()) for p in params)}  # fmt: skip

    # TextImageDataModule under this strategy: every rank reads its own shards (split by global rank) in
    # training; validation has one shard for 4 ranks, split by sample so each rank runs the same number of
    # batches (a collective per batch, as a sharded forward is, would hang otherwise).
    class Keys(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(3, 1)
            self.seen, self.val_seen, self.val_batches = [], [], 0

        def training_step(self, batch, batch_idx):
            self.seen.extend(batch["key"])
            return self.net(batch["image"].mean(dim=(2, 3))).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            if not self.trainer.sanity_checking:
                self.val_seen.extend(batch["key"])
            self.val_batches = int(self.trainer.strategy.reduce(torch.tensor(1.0), reduce_op="sum"))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    keys = Keys()
    val_shard = sorted(Path(shard_dir).glob("*.tar"))[0]  # 4 samples
    data = TextImageDataModule(
        train_shards=shard_dir, val_shards=str(val_shard), resolution=16, batch_size=4, val_batch_size=1, num_workers=0
    )
    strategy = ShardedPowerSGD(rank=None, devices_per_node=2, timeout_s=60)
    trainer = L.Trainer(accelerator="cpu", devices=4, strategy=strategy, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(keys, data)
    result["keys"], result["val_keys"] = keys.seen, keys.val_seen
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
