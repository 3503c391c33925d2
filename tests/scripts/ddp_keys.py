"""Run one epoch of TinyModel over shards with Lightning DDP (gloo, CPU); each rank writes the keys it saw.

Usage: python ddp_keys.py SHARD_DIR OUT_DIR DEVICES WORKERS [SAMPLES_PER_EPOCH]
"""

import json
import sys
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_model import TinyModel

from lit_dalle.data import TextImageDataModule

if __name__ == "__main__":
    shard_dir, out_dir, devices, workers = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    per_epoch = int(sys.argv[5]) if len(sys.argv) > 5 else None
    data = TextImageDataModule(
        train_shards=shard_dir, resolution=16, batch_size=4, num_workers=workers, samples_per_epoch=per_epoch
    )
    model = TinyModel()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, data)
    steps = trainer.global_step
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps({"keys": model.seen, "steps": steps}))
