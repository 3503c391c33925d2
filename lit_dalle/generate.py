"""``python -m lit_dalle generate``: sample images for captions from a Prior checkpoint into a captioned grid.

Sampling follows PAPER.md E.1 by default (temperature 1, no top-k / top-p) and uses the KV cache. The
paper then reranks N samples per caption with a contrastive model and keeps the best (``--rerank``: a
Hugging Face CLIP folder or a `lit_dalle.contrastive.Contrastive` checkpoint; `lit_dalle.rerank`); with
no scorer, the first ``top`` samples are kept in sampling order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from lit_dalle.callbacks.ema import load_with_ema
from lit_dalle.rerank import Scorer, load_scorer, rank


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
    """Keep the best ``top`` of N images ``[N, 3, H, W]`` of one caption, best first (else the first ``top``)."""
    if scorer is None:
        return images[:top]
    order, _ = rank(scorer, caption, images)
    return images[order[:top].to(images.device)]


def captioned_sheet(rows: Sequence[tuple[str, torch.Tensor]], pad: int = 2) -> Image.Image:
    """A picture: for each (caption, images [n, 3, H, W] in [0, 1]), the caption above a row of images."""
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
    return sheet


def captioned_grid(rows: Sequence[tuple[str, torch.Tensor]], path: str | Path, pad: int = 2) -> Path:
    """Write `captioned_sheet` of ``rows`` as a PNG (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    captioned_sheet(rows, pad).save(path)
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
    rerank: str | None = None,
) -> Path:
    """Sample images for captions from a Prior checkpoint and write a captioned PNG grid.

    Args:
        ckpt: the Prior checkpoint (its tokenizer and DVAE record are inside).
        prompt: a caption, or several as a JSON list ('["a red circle", "a blue square"]').
        out: the PNG to write.
        num_samples: images sampled per caption (N).
        top: images kept per caption (the best by ``rerank``, when given; default: all N).
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
        rerank: a contrastive scorer that orders the N samples of each caption, best first (PAPER.md E.1):
            a `Contrastive` checkpoint (``fit --config configs/clip.yaml``) or a Hugging Face CLIP folder.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"--num-samples ({num_samples}) and --batch-size ({batch_size}) must be >= 1")
    if top is not None and not 1 <= top <= num_samples:
        raise ValueError(f"--top {top} must be in [1, --num-samples {num_samples}]")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    scorer = load_scorer(rerank, device) if rerank else None  # before sampling: a wrong path fails at once
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
        rows.append((caption, select(caption, torch.cat(images), top or num_samples, scorer)))
    path = captioned_grid(rows, out)
    how = f"best {top or num_samples} of {num_samples} by {rerank}" if scorer else f"{top or num_samples} images"
    print(f"wrote {path} ({len(prompts)} captions x {how})")
    return path
