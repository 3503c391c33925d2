"""Attribute recogniser for the shapes dataset: what does an image show, and does it match its caption?

A deterministic, classical pipeline with no weights and no training, so that scores of generated images
are exact and comparable across runs:

1. The background colour is the median of the image's border (robust to colour shifts of a decoder),
   its noise level the border's median absolute deviation.
2. Foreground is every pixel far enough (in RGB) from the background, also after a 3x3 mean (which drops
   isolated noise pixels); its 8-connected components above a minimum area are the objects (the
   generator never lets two objects touch).
3. An object's colour is the palette colour nearest to the median of its most saturated pixels.
4. A soft coverage (alpha) per pixel, the projection of the pixel onto the background -> object-colour
   line (`_coverage`), gives sub-pixel area, extent and centroid, so shapes of a few pixels still
   separate: the triangle's mass sits low in its box (centroid 1/6 of the box height below its centre),
   and among the symmetric shapes the fill ratio of the box tells square (1.0), circle (0.79) and cross
   (0.56) apart.
5. The size class from the box side; the relation from the two centres (the dominant axis wins).

It never raises on a valid image: blank images give zero objects, noise gives its best guess.
``python -m lit_dalle.data.recognize`` measures its accuracy on freshly rendered samples.
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

from lit_dalle.data.shapes import COLORS, SIZES, Scene, ShapeObject, Split, generate, parse_caption

ImageLike = Image.Image | np.ndarray | torch.Tensor

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float32)  # [C, 3]
# Size threshold: geometric mean of the largest small side and the smallest large side.
_SIZE_THRESHOLD = math.sqrt(SIZES["small"][1] * SIZES["large"][0])
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as JPEG uses
_MAX_MATCHED = 8  # objects considered when matching to a caption; bounds the permutation search


@dataclass(frozen=True)
class DetectedObject:
    """One recognised object.

    Attributes:
        color: nearest palette colour.
        shape: one of the dataset's shapes.
        size: size class.
        center: centre ``(x, y)`` of the object's box as fractions of the image width / height (y down);
            the box, not the mass, as the generator places boxes (a triangle's mass sits low).
        side: estimated side of the object's box, as a fraction of the image side.
        area: soft area as a fraction of the image area.
        color_distance: RGB distance (0 to 441) between the observed and the palette colour; a large
            value means the colour is a guess.
    """

    color: str
    shape: str
    size: str
    center: tuple[float, float]
    side: float
    area: float
    color_distance: float


@dataclass(frozen=True)
class Detection:
    """Everything recognised in one image, largest object first.

    Attributes:
        objects: the recognised objects (zero or more).
    """

    objects: tuple[DetectedObject, ...]

    @property
    def relation(self) -> str | None:
        """Relation "objects[0] REL objects[1]" when exactly two objects were found, else None."""
        return relation_between(*self.objects) if len(self.objects) == 2 else None

    def to_scene(self) -> Scene | None:
        """The detection as a `Scene`, or None when it found no object or more than two."""
        if len(self.objects) not in (1, 2):
            return None
        objects = tuple(ShapeObject(o.color, o.shape, o.size) for o in self.objects)
        return Scene(objects, self.relation)


def relation_between(first: DetectedObject, second: DetectedObject) -> str:
    """Relation "first REL second" from the centres; the axis with the larger offset decides."""
    dx = first.center[0] - second.center[0]
    dy = first.center[1] - second.center[1]
    if abs(dx) > abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


@dataclass(frozen=True)
class _Frame:
    """One image and what every object's description needs from it."""

    pixels: np.ndarray  # [H, W, 3] float32 in [0, 255]
    smoothed: np.ndarray  # [H, W, 3] 3x3 mean of pixels
    measured: np.ndarray  # [H, W, 3] what coverage is measured on: pixels, or smoothed when noisy
    background: np.ndarray  # [3] median of the border
    distance: np.ndarray  # [H, W] RGB distance of each pixel from the background
    noise: float  # robust std of the background in `measured`

    @classmethod
    def of(cls, pixels: np.ndarray, denoise_above: float) -> _Frame:
        border = _border(pixels)  # [N, 3]
        background = np.median(border, axis=0)
        noise = 1.4826 * float(np.median(np.abs(border - background)))  # median absolute deviation
        smoothed = _box3(pixels)
        denoise = noise > denoise_above
        return cls(
            pixels=pixels,
            smoothed=smoothed,
            measured=smoothed if denoise else pixels,
            background=background,
            distance=np.linalg.norm(pixels - background, axis=-1),
            noise=noise / 3.0 if denoise else noise,  # a 3x3 mean divides the std by 3
        )


class AttributeRecognizer:
    """Recognise the objects, their attributes and their relation in images of the shapes dataset.

    Args:
        foreground_threshold: RGB distance (0 to 441) from the background above which a pixel is
            foreground. Palette colours are >= 169 away from the background; a low value keeps the
            soft edges of blurry images inside their object.
        min_area: components smaller than this fraction of the image are noise, not objects.
        triangle_offset: a centroid this far (fraction of the box height) below the box centre marks
            a triangle; a triangle has 1/6, the other shapes 0.
        fill_square: box fill ratio above which a symmetric shape is a square (square 1.0, circle 0.79).
        fill_circle: box fill ratio above which a symmetric shape is a circle (cross 0.56).
        denoise_above: background noise (robust std, 0 to 255) above which coverage is measured on a
            3x3 mean of the image: it blurs a little, which the features tolerate, and cuts noise 3x.
        max_objects: only the largest this many components are described (bounds the time on noise).
    """

    def __init__(
        self,
        foreground_threshold: float = 48.0,
        min_area: float = 0.002,
        triangle_offset: float = 0.08,
        fill_square: float = 0.89,
        fill_circle: float = 0.67,
        denoise_above: float = 8.0,
        max_objects: int = 16,
    ) -> None:
        self.foreground_threshold = foreground_threshold
        self.min_area = min_area
        self.triangle_offset = triangle_offset
        self.fill_square = fill_square
        self.fill_circle = fill_circle
        self.denoise_above = denoise_above
        self.max_objects = max_objects

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> Detection | list[Detection]:
        """Recognise one image, or each image of a batch.

        Args:
            images: a PIL image; a uint8 array ``[H, W, 3]``; a float tensor ``[3, H, W]`` in [0, 1]
                (or uint8 in [0, 255]);
                or a batch: a float tensor ``[B, 3, H, W]`` or a sequence of the above.

        Returns:
            One `Detection` for a single image, a list of them for a batch.
        """
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            return [self.recognize(image) for image in images]
        if isinstance(images, (list, tuple)):
            return [self.recognize(image) for image in images]
        return self.recognize(images)

    def recognize(self, image: ImageLike) -> Detection:
        """Recognise a single image (see `__call__` for the accepted types)."""
        frame = _Frame.of(_to_array(image), self.denoise_above)
        height, width = frame.distance.shape
        # A foreground pixel must also stand out after a 3x3 mean, which drops isolated noise pixels
        # without the mean's widening (that would bridge the gap between close objects).
        smooth = np.linalg.norm(frame.smoothed - frame.background, axis=-1)  # [H, W]
        threshold = self.foreground_threshold
        labels, counts = _connected_components((frame.distance > threshold) & (smooth > 0.75 * threshold))
        found = []
        labels_by_size = np.argsort(-counts, kind="stable")[: self.max_objects]
        for label in labels_by_size[counts[labels_by_size] >= self.min_area * height * width]:
            region = _grow(labels, label + 1)  # one pixel more, to catch faint anti-aliased edges
            found.append(self._describe(frame, labels == label + 1, region))
        found.sort(key=lambda o: -o.area)
        return Detection(tuple(found))

    def _describe(self, frame: _Frame, component: np.ndarray, region: np.ndarray) -> DetectedObject:
        pixels, background = frame.pixels, frame.background
        height, width, _ = pixels.shape
        # Colour from the core: the edge pixels are mixed with the background.
        inside = frame.distance[component]
        core = pixels[component][inside >= 0.8 * np.percentile(inside, 90)]  # [N, 3]
        observed = np.median(core, axis=0)
        palette_distance = np.linalg.norm(_PALETTE - observed, axis=-1)
        color = _PALETTE_NAMES[int(np.argmin(palette_distance))]
        alpha = _coverage(frame.measured, background, observed)  # [H, W]
        # Soft-threshold alpha two noise levels above zero, or background noise inflates the extents.
        floor = min(0.5, 2.0 * frame.noise / max(float(np.linalg.norm(observed - background)), 1e-6))
        alpha = np.where(region, np.clip((alpha - floor) / (1.0 - floor), 0.0, 1.0), 0.0)
        area = float(alpha.sum())
        col_cover, row_cover = alpha.max(axis=0), alpha.max(axis=1)  # [W], [H]
        box_w, box_h = max(float(col_cover.sum()), 1e-6), max(float(row_cover.sum()), 1e-6)
        ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
        mass_cy = float(alpha.sum(axis=1) @ ys) / max(area, 1e-6)
        box_cx, box_cy = float(col_cover @ xs) / box_w, float(row_cover @ ys) / box_h
        side = math.sqrt(box_w * box_h / (width * height))
        return DetectedObject(
            color=color,
            shape=self._shape(area / (box_w * box_h), (mass_cy - box_cy) / box_h),
            size="small" if side < _SIZE_THRESHOLD else "large",
            center=(box_cx / width, box_cy / height),
            side=side,
            area=area / (width * height),
            color_distance=float(palette_distance.min()),
        )

    def _shape(self, fill: float, offset: float) -> str:
        if offset > self.triangle_offset:
            return "triangle"
        if fill > self.fill_square:
            return "square"
        return "circle" if fill > self.fill_circle else "cross"


def _to_array(image: ImageLike) -> np.ndarray:
    """Any accepted image type -> float32 ``[H, W, 3]`` in [0, 255], non-finite values zeroed."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a float tensor [3, H, W] in [0, 1], got shape {tuple(image.shape)}")
        scale = 1.0 if image.dtype == torch.uint8 else 255.0
        array = image.detach().float().cpu().permute(1, 2, 0).numpy() * scale
    elif isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
    else:
        array = np.asarray(image, dtype=np.float32)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"expected an array [H, W, 3] in [0, 255], got shape {array.shape}")
    return np.nan_to_num(array, nan=0.0, posinf=255.0, neginf=0.0).clip(0.0, 255.0)


def _coverage(pixels: np.ndarray, background: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Soft coverage in [0, 1] of ``color`` over ``background`` per pixel, ``[H, W]``.

    The mean of two projections onto the background -> colour line: in RGB (the matched filter, best
    against plain noise) and in luma alone (which codecs such as JPEG keep at full resolution while
    they subsample chroma; this halves shape errors of JPEG-compressed 32 px images).
    """
    offset = pixels - background  # [H, W, 3]
    direction = color - background  # [3]
    rgb = offset @ direction / max(float(direction @ direction), 1e-6)
    luma_contrast = float(direction @ _LUMA)
    if abs(luma_contrast) < 1.0:  # no luma contrast to measure (cannot happen for the palette)
        return np.clip(rgb, 0.0, 1.0)
    return np.clip(0.5 * rgb + 0.5 * (offset @ _LUMA) / luma_contrast, 0.0, 1.0)


def _box3(pixels: np.ndarray) -> np.ndarray:
    """3x3 mean filter (edge padding), ``[H, W, 3]``."""
    height, width, _ = pixels.shape
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)) / 9.0


def _border(pixels: np.ndarray) -> np.ndarray:
    """The one-pixel frame of an image, ``[N, 3]``."""
    return np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])


def _neighbourhood_max(values: np.ndarray) -> np.ndarray:
    """Max over each pixel's 3x3 neighbourhood (zero padding)."""
    height, width = values.shape
    padded = np.pad(values, 1)
    shifted = [padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
    return np.max(shifted, axis=0)


def _connected_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of a boolean mask, without scipy.

    Returns:
        ``labels`` ``[H, W]`` (0 background, 1..N components) and ``counts`` ``[N]`` pixels per label.
    """
    height, width = mask.shape
    labels = np.where(mask, np.arange(1, height * width + 1).reshape(height, width), 0)
    while True:
        # Every pixel takes the largest label in its neighbourhood, then jumps to the label its label
        # points at (labels are 1 + a pixel index of the same component): converges in few rounds.
        grown = np.where(mask, _neighbourhood_max(labels), 0)
        flat = grown.ravel()
        jumped = np.where(mask, flat[np.maximum(grown, 1) - 1].reshape(height, width), 0)
        if np.array_equal(jumped, labels):
            break
        labels = jumped
    unique, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(height, width)
    if unique[0] != 0:  # no background pixel at all: shift so that labels start at 1
        inverse = inverse + 1
    counts = np.bincount(inverse.ravel(), minlength=int(inverse.max()) + 1)[1:]
    return inverse, counts


def _grow(labels: np.ndarray, label: int) -> np.ndarray:
    """The component plus its one-pixel ring, minus pixels of other components."""
    own = labels == label
    return (_neighbourhood_max(own.astype(np.uint8)) > 0) & ((labels == 0) | own)


def score(predicted: Detection, target: Scene) -> dict[str, float]:
    """Per-attribute correctness of a detection against the scene of a caption.

    Recognised objects are matched to the caption's objects order-independently (the assignment with
    the most correct attributes wins). ``color``, ``shape`` and ``size`` are the fraction of the
    caption's objects whose match has that attribute right (an unmatched object counts as wrong);
    ``count`` is whether the number of objects agrees; ``relation`` whether the matched objects stand
    in the caption's relation (NaN for a one-object caption); ``all`` whether everything is right.

    Returns:
        ``{"color", "shape", "size", "relation", "count", "all"}`` -> value in [0, 1] (or NaN).
    """
    found = predicted.objects[:_MAX_MATCHED]
    orders = itertools.permutations(range(len(found)), min(len(found), len(target.objects)))
    candidates = [_agreement([found[i] for i in order], target) for order in orders]  # never empty
    best = max(candidates, key=lambda r: sum(v for v in r.values() if not math.isnan(v)))
    best["count"] = float(len(predicted.objects) == len(target.objects))
    best["all"] = float(all(v == 1.0 for v in best.values() if not math.isnan(v)))
    return best


def _agreement(matched: list[DetectedObject], target: Scene) -> dict[str, float]:
    """Attribute scores when ``matched[i]`` stands for ``target.objects[i]`` (missing ones count wrong)."""
    wanted = target.objects
    result = {}
    for attribute in ("color", "shape", "size"):
        right = sum(getattr(m, attribute) == getattr(w, attribute) for m, w in zip(matched, wanted))
        result[attribute] = right / len(wanted)
    result["relation"] = math.nan
    if target.relation is not None:
        both = len(matched) == 2
        result["relation"] = float(both and relation_between(matched[0], matched[1]) == target.relation)
    return result


def score_batch(
    images: torch.Tensor | Sequence[ImageLike],
    captions: Sequence[str],
    recognizer: AttributeRecognizer | None = None,
) -> dict[str, float]:
    """Mean of `score` over (image, caption) pairs; ``relation`` averages over two-object captions only.

    Args:
        images: a float tensor ``[B, 3, H, W]`` in [0, 1] or a sequence of images.
        captions: one caption per image, parseable by `parse_caption`.
        recognizer: the recogniser to use; the default one when None.

    Returns:
        The mean of each key of `score` (NaN for ``relation`` when no caption has two objects).

    Raises:
        ValueError: the numbers of images and captions differ, or a caption does not parse.
    """
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    recognizer = recognizer or AttributeRecognizer()
    scores = [score(recognizer.recognize(im), parse_caption(text)) for im, text in zip(images, captions)]
    keys = ("color", "shape", "size", "relation", "count", "all")
    means = {}
    for key in keys:
        values = [s[key] for s in scores if not math.isnan(s[key])]
        means[key] = sum(values) / len(values) if values else math.nan
    return means


def _jpeg(image: Image.Image, quality: int = 75) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _noise(image: Image.Image, std: float = 25.0) -> Image.Image:
    noise = np.random.default_rng(0).normal(0.0, std, (image.height, image.width, 3))
    return Image.fromarray((np.asarray(image, dtype=np.float64) + noise).clip(0, 255).astype(np.uint8))


DEGRADATIONS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "none": lambda image: image,
    "jpeg75": _jpeg,
    "blur0.7": lambda image: image.filter(ImageFilter.GaussianBlur(0.7)),
    "jpeg50": lambda image: _jpeg(image, 50),
    "blur1.5": lambda image: image.filter(ImageFilter.GaussianBlur(1.5)),
    "noise25": _noise,
}
"""Degradations standing in for a lossy decoder (the first three mild), for `evaluate` and its CLI."""


def evaluate(
    split: Split,
    num_samples: int,
    *,
    seed: int = 1234,
    resolution: int = 64,
    degradation: str = "none",
    recognizer: AttributeRecognizer | None = None,
) -> dict[str, float]:
    """Accuracy of the recogniser on freshly rendered samples of a split (see `score_batch`).

    Args:
        split: which split to render.
        num_samples: how many samples.
        seed: generator seed; any seed other than the training data's gives unseen images.
        resolution: image side in pixels.
        degradation: a key of `DEGRADATIONS`, applied to each image before recognition.
        recognizer: the recogniser to use; the default one when None.
    """
    if degradation not in DEGRADATIONS:
        raise ValueError(f"degradation={degradation!r} is unknown; expected one of {list(DEGRADATIONS)}")
    samples = list(generate(split, num_samples, seed=seed, resolution=resolution))
    images = [DEGRADATIONS[degradation](sample.image) for sample in samples]
    return score_batch(images, [sample.caption for sample in samples], recognizer)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the recogniser's accuracy per split, resolution and degradation."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--splits", nargs="+", default=["val", "heldout"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[64])
    parser.add_argument("--degradations", nargs="+", default=["none", "jpeg75", "blur0.7"])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    for resolution, split, degradation in itertools.product(args.resolutions, args.splits, args.degradations):
        result = evaluate(split, args.num_samples, seed=args.seed, resolution=resolution, degradation=degradation)
        cells = " ".join(f"{key}={value:.4f}" for key, value in result.items())
        print(f"{resolution:4d}px {split:8s} {degradation:8s} {cells}")


if __name__ == "__main__":
    main()
