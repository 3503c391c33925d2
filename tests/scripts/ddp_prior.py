"""Fit a tiny Prior with Lightning DDP (gloo, 2 CPU processes): tokenizer trained at fit start, sample grids logged.

Usage: python ddp_prior.py DVAE_CKPT OUT_DIR
Each rank writes rank<R>.json: its tokenizer (JSON text), its global step and the sample grids it wrote.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lit_dalle import EmbeddedShapes, Prior, SampleLogger, TextImageDataModule

if __name__ == "__main__":
    torch.set_num_threads(1)
    dvae, out = sys.argv[1], Path(sys.argv[2])
    data = TextImageDataModule(
        resolution=32, batch_size=8, num_workers=0, augment="prior",
        embedded=EmbeddedShapes(train_samples=64, val_samples=32, heldout_samples=16, samples_per_shard=16),
    )  # fmt: skip
    model = Prior(dvae=dvae, text_vocab=300, text_len=12, image_size=32, image_vocab=64, depth=2, width=32, heads=2)
    sampler = SampleLogger(num_captions=2, num_samples=2, top=1, every_n_steps=2)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=4, limit_val_batches=1, val_check_interval=4,
        logger=TensorBoardLogger(out, name="tb"), callbacks=[sampler], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, data)
    result = {"tokenizer": model.text_tokenizer.to_str(), "step": trainer.global_step,
              "written": [str(p) for p in sampler.written]}  # fmt: skip
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
