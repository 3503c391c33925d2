"""``python -m lit_dalle evaluate``: how good a Prior's samples are (PAPER.md E.1-E.2, on our data).

For the captions of an evaluation set, sample ``max(best_of)`` images each (temperature 1, the KV cache),
rank them with a contrastive scorer, and for each N in ``best_of`` keep the best of the first N (N = 1 is
plain sampling). For every (split, N) it reports:

- **attribute accuracy** (the embedded shapes data, whose captions parse): colour, shape, size, relation,
  count and all, by the attribute recogniser, for seen (``val``) and held-out combinations;
- **CLIP score** (100 * max(cos, 0), averaged) with the scorer;
- **FID and IS** against the real images of the same captions after a Gaussian blur of each radius in
  ``blur_radii`` applied to both real and generated images (PAPER.md E.2: 0, 1, 2, 4, 8), through
  ``torchmetrics``. The feature extractor is pluggable: ``features="inception"`` is torchmetrics' default
  Inception-v3, which needs ``torch-fidelity`` and its weights (downloaded on first use, impossible
  offline; ``inception_weights`` takes a local file for FID). Otherwise ``features`` is a scorer path
  (a `Contrastive` checkpoint or a Hugging Face CLIP folder): FID on its image embeddings, IS on its
  zero-shot class probabilities over ``classes`` prompts (default: the embedded colour-shape pairs).
  With ~100 images per split FID is biased upwards; compare numbers of the same size only.

The real images' and the DVAE reconstructions' attribute scores are reported as references: the DVAE
bounds what any Prior can reach. Everything lands in one JSON file and a printed table.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.transforms.functional import gaussian_blur

from lit_dalle.rerank import Scorer, caption_scores, clip_score_of, load_scorer

__all__ = ["ScorerFeatures", "ZeroShotLogits", "blur", "evaluate", "evaluation_set"]

PAPER_BLUR_RADII = (0.0, 1.0, 2.0, 4.0, 8.0)


def blur(images: Tensor, radius: float) -> Tensor:
    """Gaussian blur of standard deviation ``radius`` pixels (Pillow's GaussianBlur convention); 0 is identity."""
    if radius <= 0:
        return images
    kernel = 2 * math.ceil(3 * radius) + 1
    return gaussian_blur(images, [kernel, kernel], [radius, radius])


class ScorerFeatures(nn.Module):
    """FID features: a scorer's unit image embeddings of images in [0, 1]."""

    def __init__(self, scorer: Scorer) -> None:
        super().__init__()
        self.scorer = scorer

    def forward(self, images: Tensor) -> Tensor:
        """Features ``[B, D]`` (fp64 is left to torchmetrics)."""
        return self.scorer.embed_images(images).float().cpu()


class ZeroShotLogits(nn.Module):
    """IS logits: a scorer's zero-shot classifier, 100 * cosine to each class prompt (CLIP's scale)."""

    def __init__(self, scorer: Scorer, classes: Sequence[str]) -> None:
        super().__init__()
        self.scorer = scorer
        self.register_buffer("prompts", scorer.embed_texts(list(classes)).float().cpu(), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, num_classes]``, fp64: IS takes log(mean probability), which fp32 would underflow to log(0)."""
        return 100 * self.scorer.embed_images(images).double().cpu() @ self.prompts.double().t()


def _default_classes() -> list[str]:
    from lit_dalle.data.shapes import COLORS, SHAPES

    return [f"a {color} {shape}" for color in COLORS for shape in SHAPES]


def evaluation_set(
    split: str, num: int, resolution: int, data: str | None = None, seed: int = 0
) -> tuple[list[str], Tensor]:
    """Captions and real images ``[N, 3, R, R]`` in [0, 1]: the embedded split, or the first ``num`` of shards."""
    if data is None:
        from lit_dalle.data import shapes

        samples = list(shapes.generate(split, num, seed=seed, resolution=resolution))  # type: ignore[arg-type]
        images = torch.stack([torch.from_numpy(np.array(s.image)).permute(2, 0, 1) for s in samples])
        return [s.caption for s in samples], images.float() / 255
    import webdataset as wds

    from lit_dalle.data.augment import CenterResize
    from lit_dalle.data.decode import decode_raw_image, normalize_caption
    from lit_dalle.data.shards import IMAGE_EXTENSIONS, expand_shards

    captions, images = [], []
    for sample in wds.tarfile_to_samples(handler=wds.warn_and_continue)(
        iter([{"url": u} for u in expand_shards(data)])
    ):
        image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        if image is None or "txt" not in sample:
            continue
        try:
            images.append(CenterResize(resolution)(decode_raw_image(image, min_side=resolution)))
            captions.append(normalize_caption(sample["txt"].decode("utf-8")))
        except (ValueError, UnicodeDecodeError):
            continue
        if len(captions) == num:
            break
    if not captions:
        raise ValueError(f"--data {data!r}: no readable (image, caption) pair")
    return captions, torch.stack(images).float() / 255


def _attributes(images: Tensor, captions: list[str]) -> dict[str, float] | None:
    from lit_dalle.data.recognize import score_batch

    try:
        return score_batch(images, captions)
    except ValueError:  # captions of other data do not parse: no attribute accuracy
        return None


def _image_metrics(
    real: Tensor, fake: Tensor, radii: Sequence[float], fid_features: nn.Module | int, is_features: nn.Module | None,
    inception_weights: str | None,
) -> dict[str, dict[str, float]]:  # fmt: skip
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore

    out: dict[str, dict[str, float]] = {"fid": {}, "is": {}}
    for radius in radii:
        kwargs: dict[str, Any] = {"feature": fid_features, "normalize": True}
        if inception_weights:
            kwargs["feature_extractor_weights_path"] = inception_weights
        fid = FrechetInceptionDistance(**kwargs)
        fid.update(blur(real, radius), real=True)
        fid.update(blur(fake, radius), real=False)
        out["fid"][f"{radius:g}"] = float(fid.compute())
        if is_features is None and not isinstance(fid_features, int):
            continue  # no classifier for IS (a scorer extractor without class prompts)
        inception = InceptionScore(
            feature=is_features if is_features is not None else "logits_unbiased",
            normalize=is_features is None,  # (torchmetrics turns [0, 1] floats into bytes for any IS extractor)
            splits=max(2, min(10, len(fake) // 10)),
        )  # fmt: skip
        inception.update(blur(fake, radius))
        out["is"][f"{radius:g}"] = float(inception.compute()[0])
    return out


def _inception_or_explain(inception_weights: str | None) -> None:
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "--features inception is torchmetrics' default Inception-v3: it needs `pip install torch-fidelity` and "
            "its weights, downloaded on first use (impossible offline; give --inception-weights FILE for FID). "
            "Or score with a contrastive model: --features runs/clip/checkpoints/last.ckpt (or a Hugging Face CLIP "
            "folder)."
        ) from err
    if inception_weights and not Path(inception_weights).is_file():
        raise FileNotFoundError(f"--inception-weights {inception_weights!r} not found")


def evaluate(
    ckpt: str,
    rerank: str | None = None,
    out: str = "metrics.json",
    best_of: list[int] | None = None,
    num_captions: int = 100,
    splits: list[str] = ["val", "heldout"],  # noqa: B006  (shown by --help; never mutated)
    data: str | None = None,
    blur_radii: list[float] = list(PAPER_BLUR_RADII),  # noqa: B006
    features: str | None = None,
    inception_weights: str | None = None,
    classes: list[str] | None = None,
    dvae: str | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    use_ema: bool = True,
) -> dict[str, Any]:
    """Sample, rerank and score a Prior: attribute accuracy, CLIP score, FID / IS with blur, into one JSON file.

    Args:
        ckpt: the Prior checkpoint.
        rerank: the scorer ranking the samples and giving the CLIP score (a `Contrastive` checkpoint or a
            Hugging Face CLIP folder); None: best-of-1 only, no CLIP score.
        out: the JSON file to write.
        best_of: the N of best-of-N (the paper reranks 512; Fig. 9c: gains up to 32); default [1, 4, 16] with
            ``rerank``, [1] without.
        num_captions: captions per split.
        splits: embedded-dataset splits ("val": seen attribute combinations; "heldout": never trained on).
        data: shards to take captions and real images from instead of the embedded data (one split, "data").
        blur_radii: Gaussian blur radii for FID / IS (PAPER.md E.2: 0 1 2 4 8); [] skips FID and IS.
        features: FID / IS feature extractor: "inception" (torchmetrics' default; needs torch-fidelity and
            its weights) or a scorer path; default: the ``rerank`` scorer.
        inception_weights: a local Inception-v3 weights file for FID with ``features=inception``.
        classes: IS class prompts for a scorer extractor (default: the embedded colour-shape pairs).
        dvae: the DVAE to decode with (default: the one the Prior recorded).
        batch_size: images sampled at once.
        seed: sampling seed.
        device: where to run.
        use_ema: sample with the checkpoint's EMA weights when it has them.
    """
    from lit_dalle.generate import load_prior

    best_of = best_of or ([1, 4, 16] if rerank else [1])
    if min(best_of) < 1:
        raise ValueError(f"--best-of {best_of}: give sizes >= 1, e.g. [1, 4, 16]")
    if max(best_of) > 1 and rerank is None:
        raise ValueError(f"--best-of {best_of} needs --rerank (a scorer); without one only --best-of [1] is defined")
    started = time.time()
    scorer = load_scorer(rerank, device) if rerank else None
    features = features or rerank
    fid_features: nn.Module | int | None = None
    is_features: nn.Module | None = None
    if blur_radii:
        if features is None:
            raise ValueError("FID / IS need --features (inception, or a scorer path) or --rerank; or --blur-radii []")
        if features == "inception":
            _inception_or_explain(inception_weights)
            fid_features = 2048
        else:
            feature_scorer = scorer if features == rerank and scorer is not None else load_scorer(features, device)
            fid_features = ScorerFeatures(feature_scorer)
            is_features = ZeroShotLogits(feature_scorer, classes or _default_classes())
    prior = load_prior(ckpt, dvae, device, use_ema)
    size, n_max = prior.hparams.image_size, max(best_of)
    results: dict[str, Any] = {"ckpt": ckpt, "scorer": rerank, "features": features, "num_captions": num_captions,
                               "blur_radii": blur_radii, "splits": {}}  # fmt: skip
    for split in [None] if data else splits:
        name = "data" if data else split
        captions, real = evaluation_set(split or "val", num_captions, size, data)
        with torch.no_grad():
            recon = torch.cat([prior.dvae.reconstruct(real[s : s + batch_size].to(prior.device)).cpu()
                               for s in range(0, len(real), batch_size)])  # fmt: skip
        samples = []  # [C, n_max, 3, H, W]
        for index, caption in enumerate(captions):
            images = [prior.generate([caption] * min(batch_size, n_max - s), seed=seed + 1000 * index + s).cpu()
                      for s in range(0, n_max, batch_size)]  # fmt: skip
            samples.append(torch.cat(images))
        scores = None
        if scorer is not None:
            scores = torch.stack(
                [caption_scores(scorer, c, imgs, batch_size).cpu() for c, imgs in zip(captions, samples)]
            )
        split_out: dict[str, Any] = {
            "reference": {
                "real images": _attributes(real, captions),
                "DVAE reconstructions": _attributes(recon, captions),
            }
        }
        for n in sorted(set(best_of)):
            pick = scores[:, :n].argmax(dim=1) if scores is not None else torch.zeros(len(captions), dtype=torch.long)
            chosen = torch.stack([imgs[i] for imgs, i in zip(samples, pick.tolist())])
            entry: dict[str, Any] = {"attributes": _attributes(chosen, captions)}
            if scorer is not None:
                entry["clip_score"] = float(clip_score_of(scores.gather(1, pick[:, None])))  # the chosen ones' cosines
            if fid_features is not None:
                entry.update(_image_metrics(real, chosen, blur_radii, fid_features, is_features, inception_weights))
            split_out[f"best_of_{n}"] = entry
        results["splits"][name] = split_out
    results["seconds"] = round(time.time() - started, 1)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(format_table(results))
    print(f"wrote {path}")
    return results


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table of the results: one row per (split, best-of-N), attribute accuracy and image metrics."""
    keys = ("color", "shape", "size", "relation", "count", "all")
    radii = [f"{r:g}" for r in results.get("blur_radii", [])]
    head = ["split", "images", *keys, "CLIP score", *[f"FID-{r}" for r in radii], *[f"IS-{r}" for r in radii]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(value: Any) -> str:
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"

    for split, entries in results["splits"].items():
        rows = [(n, e.get("attributes"), e) for n, e in entries.items() if n.startswith("best_of")]
        rows += [(n, a, {}) for n, a in entries["reference"].items()]
        for label, attributes, entry in rows:
            cells = [split, label.replace("_", " ")]
            cells += [fmt((attributes or {}).get(k)) for k in keys]
            cells += [fmt(entry.get("clip_score"))]
            cells += [fmt(entry.get("fid", {}).get(r)) for r in radii] + [
                fmt(entry.get("is", {}).get(r)) for r in radii
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
