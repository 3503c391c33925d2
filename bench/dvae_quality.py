"""Reconstruction quality of a trained DVAE on the embedded shapes dataset's validation split.

Reports PSNR and MSE of the argmax reconstructions, the fraction of codes used and the codebook
perplexity, and the attribute recogniser's accuracy (`lit_dalle.data.recognize.score_batch`) on the
reconstructions against the captions, next to its accuracy on the original images (its ceiling).

Two diagnoses of lost colour follow:

- colour-code sharing: each token patch is labelled by the palette colour that covers most of it (or
  background); a row gives, for the patches of one colour, the fraction whose argmax code is used mostly by
  each label. Off-diagonal mass means two colours share codes and decode as their mix (green + blue -> cyan).
- the decoder's ln b on background and on object pixels: on the exactly flat background an unfloored
  logit-Laplace scale collapses (b -> 0) and its 1 / b gradients dwarf those of object pixels.

    python bench/dvae_quality.py runs/dvae/lightning_logs/version_0/checkpoints/last.ckpt --samples 512
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from lit_dalle.callbacks import load_with_ema
from lit_dalle.data import TextImageDataModule
from lit_dalle.data.recognize import score_batch
from lit_dalle.data.shapes import BACKGROUND, COLORS
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
    images = torch.cat(originals)
    with torch.no_grad():
        tokens = model.encode(images)
        log_b = model.decoder.forward_tokens(tokens)[:, model.channels :].float()
    floor = model.hparams.get("min_log_scale")
    if floor is not None:  # the scale the NLL uses
        log_b = log_b.clamp_min(floor)
    colour_code_sharing(images, tokens, model.downsample, model.vocab_size)
    background = (images - torch.tensor(BACKGROUND).view(1, 3, 1, 1) / 255).abs().amax(1, keepdim=True) < 0.01
    background = background.expand_as(log_b)
    print(f"background pixels {float(background.float().mean()):.2f}")
    for name, where in [("background", background), ("objects", ~background)]:
        v = log_b[where]
        print(
            f"decoder ln b on {name}: mean {float(v.mean()):.2f}, median {float(v.median()):.2f}, "
            f"mean 1/b {float(torch.exp(-v).mean()):.1f}"
        )


def colour_code_sharing(images: torch.Tensor, tokens: torch.Tensor, f: int, vocab_size: int) -> None:
    """Print, per patch label, the fraction of its patches whose argmax code is used mostly by each label."""
    names = ["background", *COLORS]
    palette = torch.tensor([BACKGROUND, *COLORS.values()]).float() / 255
    nearest = (
        torch.cdist(images.movedim(1, -1).reshape(-1, 3), palette).argmin(1).view(images.shape[0], *images.shape[2:])
    )
    counts = F.one_hot(nearest, len(names)).float()  # [B, H, W, labels]
    per_patch = F.avg_pool2d(counts.movedim(-1, 1), f).movedim(1, -1)  # fraction of each label per token patch
    objects = per_patch[..., 1:]
    label = torch.where(objects.amax(-1) >= 0.25, objects.argmax(-1) + 1, 0)  # a colour covering >= 1/4 of it
    use = torch.zeros(len(names), vocab_size)
    use.index_put_((label.flatten(), tokens.flatten()), torch.ones(label.numel()), accumulate=True)
    owner = use.argmax(0)  # the label that uses each code most
    print("colour-code sharing (row: patches of a label; column: label that mostly uses their code)")
    print("| | " + " | ".join(names) + " | codes |")
    print("|---|" + "---:|" * (len(names) + 1))
    for i, name in enumerate(names):
        row = [float(use[i, owner == j].sum() / use[i].sum().clamp_min(1)) for j in range(len(names))]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + f" | {int((use[i] > 0).sum())} |")


if __name__ == "__main__":
    main()
