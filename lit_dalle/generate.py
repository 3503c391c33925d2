"""``python -m lit_dalle generate``: sample images for captions from a Prior checkpoint into a captioned grid.

Sampling follows PAPER.md E.1 by default (temperature 1, no top-k / top-p) and uses the KV cache. The
paper then reranks N samples per caption with a contrastive model and keeps the best; `select` is where
a scorer plugs in: with none, the first ``top`` samples are kept in sampling order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from lit_dalle.callbacks.ema import load_with_ema

Scorer = Callable[[list[str], torch.Tensor], torch.Tensor]
"""Scores (caption, image) pairs: (B captions, images [B, 3, H, W] in [0, 1]) -> [B] higher is better."""


def load_prior(ckpt: str, dvae: str | None = None, device: str = "cpu", use_ema: bool = True) -> Any:
    """Load a Prior checkpoint for sampling: EMA weights when present, eval mode, on ``device``.

    Args:
        ckpt: the Prior checkpoint.
        dvae: a DVAE checkpoint to decode with; None uses the one the Prior recorded (it must be the same).
        device: where to run.
        use_ema: use the checkpoint's EMA weights when it has them.
    """
    from lit_dalle.prior import Prior

    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"--ckpt {ckpt!r} not found (train a Prior: fit --config configs/prior.yaml)")
    overrides = {"dvae": dvae} if dvae else {}
    prior = load_with_ema(Prior, ckpt, use_ema=use_ema, **overrides)
    return prior.to(device).eval()


def image_prefix_tokens(prior: Any, path: str, rows: int) -> torch.Tensor:
    """The first ``rows`` rows of an image file's tokens, ``[1, rows * grid]`` (centre crop, DVAE encode)."""
    from lit_dalle.data.augment import CenterResize
    from lit_dalle.data.decode import decode_raw_image

    if not 0 < rows < prior.grid:
        raise ValueError(f"--prefix-rows must be in [1, {prior.grid - 1}] for a {prior.grid}x{prior.grid} grid")
    image = CenterResize(prior.hparams.image_size)(decode_raw_image(Path(path).read_bytes()))
    tokens = prior.dvae.encode(image[None].float().div(255).to(prior.device))  # [1, grid, grid]
    return tokens[:, :rows].flatten(1)


def select(caption: str, images: torch.Tensor, top: int, scorer: Scorer | None = None) -> torch.Tensor:
    """Keep the best ``top`` of N images ``[N, 3, H, W]`` of one caption (by ``scorer``; else the first ``top``)."""
    if scorer is None or top >= images.shape[0]:
        return images[:top]
    scores = scorer([caption] * images.shape[0], images)  # [N]
    return images[scores.argsort(descending=True)[:top]]


def captioned_grid(rows: Sequence[tuple[str, torch.Tensor]], path: str | Path, pad: int = 2) -> Path:
    """Write a PNG: for each (caption, images [n, 3, H, W] in [0, 1]), the caption above a row of images."""
    bands = []
    for caption, images in rows:
        grid = make_grid(images.float().cpu().clamp(0, 1), nrow=images.shape[0], padding=pad, pad_value=1.0)
        array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        picture = Image.fromarray(array)
        band = Image.new("RGB", (picture.width, picture.height + 14), "white")
        ImageDraw.Draw(band).text((pad, 1), caption, fill="black")
        band.paste(picture, (0, 14))
        bands.append(band)
    sheet = Image.new("RGB", (max(b.width for b in bands), sum(b.height for b in bands)), "white")
    top = 0
    for band in bands:
        sheet.paste(band, (0, top))
        top += band.height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def generate(
    ckpt: str,
    prompt: str | list[str],
    out: str = "samples.png",
    num_samples: int = 8,
    top: int | None = None,
    dvae: str | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    device: str = "cpu",
    use_ema: bool = True,
    prefix_image: str | None = None,
    prefix_rows: int = 0,
) -> Path:
    """Sample images for captions from a Prior checkpoint and write a captioned PNG grid.

    Args:
        ckpt: the Prior checkpoint (its tokenizer and DVAE record are inside).
        prompt: a caption, or several as a JSON list ('["a red circle", "a blue square"]').
        out: the PNG to write.
        num_samples: images sampled per caption (N).
        top: images kept per caption (the best by the scorer, when one is given; default: all N).
        dvae: DVAE checkpoint to decode with; default: the one the Prior was trained with.
        temperature: softmax temperature (the paper: 1).
        top_k: keep only the k most likely tokens per step (the paper: none).
        top_p: nucleus sampling threshold (the paper: none).
        seed: sampling seed (the same seed gives the same images).
        batch_size: images sampled at once.
        device: where to run ("cpu", "cuda").
        use_ema: sample with the checkpoint's EMA weights when it has them.
        prefix_image: an image file whose first ``prefix_rows`` rows of tokens are kept and the rest
            sampled (PAPER.md E.1 image-to-image: the caption describes the whole picture).
        prefix_rows: token rows of ``prefix_image`` to keep (the paper: 15 of 32).
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"--num-samples ({num_samples}) and --batch-size ({batch_size}) must be >= 1")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    prior = load_prior(ckpt, dvae, device, use_ema)
    prefix = None
    if prefix_image is not None:
        prefix = image_prefix_tokens(prior, prefix_image, prefix_rows)
    elif prefix_rows:
        raise ValueError(f"--prefix-rows {prefix_rows} needs --prefix-image")
    rows = []
    for index, caption in enumerate(prompts):
        images = []
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            images.append(prior.generate([caption] * n, temperature=temperature, top_k=top_k, top_p=top_p,
                                         seed=seed + 1000 * index + start,
                                         image_prefix=None if prefix is None else prefix.expand(n, -1)))  # fmt: skip
        rows.append((caption, select(caption, torch.cat(images), top or num_samples)))
    path = captioned_grid(rows, out)
    print(f"wrote {path} ({len(prompts)} captions x {top or num_samples} images)")
    return path
