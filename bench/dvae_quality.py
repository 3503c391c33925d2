"""Reconstruction quality of a trained DVAE on the embedded shapes dataset's validation split.

Reports PSNR and MSE of the argmax reconstructions, the fraction of codes used and the codebook
perplexity, and the attribute recogniser's accuracy (`lit_dalle.data.recognize.score_batch`) on the
reconstructions against the captions, next to its accuracy on the original images (its ceiling).

    python bench/dvae_quality.py runs/dvae/lightning_logs/version_0/checkpoints/last.ckpt --samples 512
"""

from __future__ import annotations

import argparse
import math

import torch

from lit_dalle.callbacks import load_with_ema
from lit_dalle.data import TextImageDataModule
from lit_dalle.data.recognize import score_batch
from lit_dalle.dvae import DVAE, CodebookUsage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--no-ema", action="store_true", help="use the trained weights, not the EMA")
    args = p.parse_args()

    model = load_with_ema(DVAE, args.checkpoint, use_ema=not args.no_ema)
    data = TextImageDataModule(resolution=args.resolution, batch_size=64, num_workers=0)
    data.prepare_data()
    data.setup("validate")
    usage = CodebookUsage(model.vocab_size)
    sq_err, n_values, seen = 0.0, 0, 0
    originals, reconstructions, captions = [], [], []
    for batch in data.val_dataloader():
        batch = data.on_after_batch_transfer(batch, 0)
        images = batch["image"][: args.samples - seen]
        tokens = model.encode(images)
        recon = model.decode(tokens)
        usage.update(tokens)
        sq_err += float((recon - images).pow(2).sum())
        n_values += images.numel()
        originals.append(images)
        reconstructions.append(recon)
        captions += batch["caption"][: len(images)]
        seen += len(images)
        if seen >= args.samples:
            break
    mse = sq_err / n_values
    codes = usage.compute()
    on_recon = score_batch(torch.cat(reconstructions), captions)
    on_orig = score_batch(torch.cat(originals), captions)
    print(f"{seen} validation images, {args.resolution} px, {'trained' if args.no_ema else 'EMA'} weights")
    print(f"PSNR {10 * math.log10(1 / mse):.2f} dB, MSE {mse:.5f}")
    print(f"codes used {float(codes['used']):.3f} of {model.vocab_size}, perplexity {float(codes['perplexity']):.1f}")
    print("| recogniser accuracy | " + " | ".join(on_recon) + " |")
    print("|---|" + "---:|" * len(on_recon))
    print("| reconstructions | " + " | ".join(f"{v:.3f}" for v in on_recon.values()) + " |")
    print("| originals (ceiling) | " + " | ".join(f"{v:.3f}" for v in on_orig.values()) + " |")


if __name__ == "__main__":
    main()
