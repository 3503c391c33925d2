"""Two-process runs (gloo, CPU) for tests/strategies/test_two_ranks.py.

Usage: python shard_two_ranks.py MODE OUT_DIR
  ema: EMA on a 2-device sharded run (3 steps, checkpoint, resume to 5), then DDPPowerSGD and
       PerResblockScaling under ShardedPowerSGD (2 nodes of 1 device) with an inf; rank 0 writes results.
  die: rank 1 exits at step 2; the job must fail rather than hang.
"""

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from strategies.tiny_lm import TinyLM

from lit_dalle.callbacks import EMA
from lit_dalle.plugins import DDPPowerSGD, PerResblockScaling, ShardedPowerSGD

torch.set_num_threads(1)
QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


class Dies(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2 and trainer.global_rank == 1:
            os._exit(3)


def full_ema(trainer: L.Trainer, ema: EMA) -> dict:
    return {k: v.full_tensor() for k, v in trainer.strategy._as_params(ema.ema).items()}  # collective


def ema_runs(out: Path) -> dict:
    result = {}
    torch.manual_seed(0)
    model, ema = TinyLM(), EMA(decay=0.5, copy_at_end=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ShardedPowerSGD(timeout_s=60), max_steps=3,
                        callbacks=[ema], **QUIET)  # fmt: skip
    trainer.fit(model)
    trainer.save_checkpoint(out / "ema.ckpt")
    at3 = full_ema(trainer, ema)
    torch.manual_seed(0)
    model, ema = TinyLM(), EMA(decay=0.5, copy_at_end=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ShardedPowerSGD(timeout_s=60), max_steps=5,
                        callbacks=[ema], **QUIET)  # fmt: skip
    trainer.fit(model, ckpt_path=out / "ema.ckpt")
    at5 = full_ema(trainer, ema)
    if trainer.global_rank == 0:
        torch.save({"at3": at3, "at5": at5, "updates": ema.num_updates}, out / "ema.pt")

    # A full (single-file) checkpoint: EMA and error buffers gathered on save, split again on load.
    saved = {}
    for steps, ckpt in ((2, None), (2, out / "full.ckpt")):
        torch.manual_seed(0)
        model, ema = TinyLM(), EMA(decay=0.5, copy_at_end=False)
        strategy = ShardedPowerSGD(rank=4, devices_per_node=1, save_distributed_checkpoint=False, timeout_s=60)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, callbacks=[ema], **QUIET)
        trainer.fit(model, ckpt_path=ckpt)
        state = {
            "ema": full_ema(trainer, ema),
            "errors": {k: v.full_tensor() for k, v in strategy._error_sums().items()},
        }
        if ckpt is None:
            trainer.save_checkpoint(out / "full.ckpt")
            saved = state
    result["full_checkpoint"] = {
        "is_file": (out / "full.ckpt").is_file(), "buffers": len(saved["errors"]),
        "ema_diff": max(float((state["ema"][k] - saved["ema"][k]).abs().max()) for k in saved["ema"]),
        "error_diff": max(float((state["errors"][k] - saved["errors"][k]).abs().max()) for k in saved["errors"]),
        "error_max": max(float(v.abs().max()) for v in saved["errors"].values()),
    }  # fmt: skip

    # DDP with torch's PowerSGD hook (registered by the strategy on CPU too).
    torch.manual_seed(0)
    model = TinyLM()
    strategy = DDPPowerSGD(matrix_approximation_rank=1, start_powerSGD_iter=2)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=4, **QUIET)
    trainer.fit(model)
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    gathered = trainer.strategy.all_gather(sums)
    result["ddp_powersgd"] = {"iter": strategy.powersgd_state.iter, "errors": len(strategy.powersgd_state.error_dict),
                              "replicas_agree": bool(torch.equal(gathered[0], gathered[1])),
                              "losses": model.losses}  # fmt: skip

    # PerResblockScaling with ShardedPowerSGD on 2 nodes of 1 device: an inf in rank 1's gradient at step 1.
    torch.manual_seed(0)
    model = TinyLM(inject_inf=(1, 1))
    strategy = ShardedPowerSGD(rank=4, devices_per_node=1, timeout_s=60)
    plugin = PerResblockScaling(device="cpu")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, plugins=[plugin], max_steps=3, **QUIET)
    trainer.fit(model)
    result["fp16"] = {"strategy_skipped": strategy.skipped_steps, "plugin_skipped": int(plugin.scales.skipped),
                      "losses": model.losses,
                      "errors_finite": all(bool(torch.isfinite(s.error).all()) for s in strategy.reducer.shards),
                      "compressed": len(strategy.reducer.shards)}  # fmt: skip
    return result


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "die":
        torch.manual_seed(0)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ShardedPowerSGD(timeout_s=20), max_steps=50,
                            callbacks=[Dies()], **QUIET)  # fmt: skip
        trainer.fit(TinyLM())
        sys.exit(0)  # not reached when a rank dies
    result = ema_runs(out)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        (out / "two_ranks.json").write_text(json.dumps(result))
