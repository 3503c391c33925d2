"""The embedded dataset: procedurally rendered, captioned scenes of coloured shapes.

Every shipped config trains on this dataset, and it doubles as an exact, offline quality check: the
attributes of a generated image can be recognised (`lit_dalle.data.recognize`) and compared with the
caption it was generated from (`parse_caption` inverts the caption templates).

A scene holds one or two objects. Each object has a colour (`COLORS`), a shape (`SHAPES`) and a size
class (`SIZES`); two objects are tied by a spatial relation (`RELATIONS`), read as "object 1 REL
object 2", and rendered so that the relation holds with a wide margin: the centres are at least twice
as far apart along the relation's axis as across it, and the objects never touch. Positions and sizes
are jittered, but the size classes never overlap. The background is a fixed near-black grey that is not
in the palette.

Splits and the zero-shot claim in miniature (Ramesh et al. 2021, Sec. 3.1):

- ``train``: only the seen (colour, shape) combinations, i.e. all but `HELDOUT_COMBINATIONS`.
- ``val``: drawn like ``train`` (seen combinations only) but from a different random stream.
- ``heldout``: every scene has at least one object whose (colour, shape) is in `HELDOUT_COMBINATIONS`.
  Each held-out colour and shape appears in ``train``, only never together, so a model that renders
  "a red triangle" well has composed attributes it saw apart.

Sample ``i`` of a split is a pure function of ``(split, seed, i)`` (its own `numpy` generator), so it is
the same whatever ``num_samples`` is, and any shard of the dataset can be regenerated on its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

Split = Literal["train", "val", "heldout"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (170, 50, 210),
    "white": (235, 235, 235),
}
"""Colour name -> RGB. Pairwise RGB distances are >= 138 (blue-purple), so they survive a blurry decoder."""

BACKGROUND: tuple[int, int, int] = (25, 25, 25)
"""Plain background colour, >= 169 away from every palette colour."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
"""Shapes, all inscribed in a size x size box; fill ratio and symmetry tell them apart at a few pixels."""

SIZES: dict[str, tuple[float, float]] = {"small": (0.18, 0.23), "large": (0.34, 0.42)}
"""Size class -> range of the object's side, as a fraction of the image side (the gap keeps them apart)."""

RELATIONS: tuple[str, ...] = ("above", "below", "to the left of", "to the right of")
"""Spatial relations between two objects, read as "object 1 REL object 2"."""

HELDOUT_COMBINATIONS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square"), ("purple", "cross")}
)
"""(colour, shape) pairs never in ``train`` / ``val``; every ``heldout`` scene has at least one of them."""

ONE_OBJECT_TEMPLATES: tuple[str, ...] = ("a {a}", "there is a {a}", "a picture of a {a}")
"""Caption templates for one object; ``{a}`` is "SIZE COLOUR SHAPE"."""

TWO_OBJECT_TEMPLATES: tuple[str, ...] = (
    "a {a} {rel} a {b}",
    "a {a} is {rel} a {b}",
    "there is a {a} {rel} a {b}",
)
"""Caption templates for two objects: object 1 ``{a}``, the relation ``{rel}``, object 2 ``{b}``."""

_SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1, "heldout": 2}
_TWO_OBJECT_PROBABILITY = 0.6
_MARGIN = 0.02  # free border, as a fraction of the image side, so no object is cut by the frame
_GAP = 0.05  # minimum free space between two objects along the relation's axis...
_GAP_PIXELS = 3.0  # ...and in pixels: a clean background line between objects even after a blur
_SUPERSAMPLE = 4  # render at 4x and box-filter down: exact area anti-aliasing, no ringing


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene.

    Attributes:
        color: a key of `COLORS`.
        shape: one of `SHAPES`.
        size: a key of `SIZES`.
    """

    color: str
    shape: str
    size: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("color", self.color, COLORS),
            ("shape", self.shape, SHAPES),
            ("size", self.size, SIZES),
        ):
            if value not in allowed:
                raise ValueError(f"ShapeObject.{name}={value!r} is unknown; expected one of {list(allowed)}")

    @property
    def phrase(self) -> str:
        """The caption phrase, e.g. "small red circle"."""
        return f"{self.size} {self.color} {self.shape}"

    @property
    def is_heldout(self) -> bool:
        """Whether the (colour, shape) pair is one of `HELDOUT_COMBINATIONS`."""
        return (self.color, self.shape) in HELDOUT_COMBINATIONS


@dataclass(frozen=True)
class Scene:
    """What an image shows: one object, or two objects and the relation "objects[0] REL objects[1]".

    Attributes:
        objects: one or two objects.
        relation: one of `RELATIONS` for two objects, None for one.
    """

    objects: tuple[ShapeObject, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a Scene holds 1 or 2 objects, got {len(self.objects)}")
        if len(self.objects) == 2 and self.relation not in RELATIONS:
            raise ValueError(f"two objects need a relation in {list(RELATIONS)}, got {self.relation!r}")
        if len(self.objects) == 1 and self.relation is not None:
            raise ValueError(f"one object takes no relation, got {self.relation!r}")

    def to_json(self) -> str:
        """Serialise to the JSON text stored as a sample's ``KEY.json``."""
        objects = [{"color": o.color, "shape": o.shape, "size": o.size} for o in self.objects]
        return json.dumps({"objects": objects, "relation": self.relation}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Scene:
        """Inverse of `to_json`.

        Raises:
            ValueError: the text is not a serialised scene.
        """
        try:
            data = json.loads(text)
            objects = tuple(ShapeObject(o["color"], o["shape"], o["size"]) for o in data["objects"])
            return cls(objects, data.get("relation"))
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"not a serialised Scene: {text!r:.200}") from error


@dataclass(frozen=True)
class ShapeSample:
    """One generated sample.

    Attributes:
        key: unique, stable key, ``f"{split}-{index:07d}"``.
        image: RGB image of ``resolution x resolution``.
        caption: lowercase caption, parseable by `parse_caption`.
        scene: the scene the image and the caption show.
    """

    key: str
    image: Image.Image
    caption: str
    scene: Scene


def generate(split: Split, num_samples: int, *, seed: int = 0, resolution: int = 64) -> Iterator[ShapeSample]:
    """Iterate over ``num_samples`` samples of a split; sample ``i`` depends only on ``(split, seed, i)``.

    Args:
        split: ``train``, ``val`` (seen combinations) or ``heldout`` (see the module docstring).
        num_samples: how many samples to yield, indices ``0 .. num_samples - 1``.
        seed: selects an independent dataset; a non-negative integer.
        resolution: side of the square images in pixels, 32 to 256 (higher works, just slower).

    Raises:
        ValueError: an unknown split, a negative count or seed, or a resolution below 32.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples={num_samples} must be >= 0")
    _check(split, seed, resolution)  # here, not lazily at the first next(): fail at the call
    return (make_sample(split, i, seed=seed, resolution=resolution) for i in range(num_samples))


def make_sample(split: Split, index: int, *, seed: int = 0, resolution: int = 64) -> ShapeSample:
    """Build sample ``index`` of a split (what `generate` yields at that index)."""
    _check(split, seed, resolution)
    if index < 0:
        raise ValueError(f"index={index} must be >= 0")
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    scene = _sample_scene(split, rng)
    templates = TWO_OBJECT_TEMPLATES if scene.relation else ONE_OBJECT_TEMPLATES
    caption = caption_for(scene, templates[rng.integers(len(templates))])
    image = render(scene, rng, resolution)
    return ShapeSample(key=f"{split}-{index:07d}", image=image, caption=caption, scene=scene)


def _check(split: str, seed: int, resolution: int) -> None:
    if split not in _SPLIT_IDS:
        raise ValueError(f"split={split!r} is unknown; expected one of {list(_SPLIT_IDS)}")
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0")
    if resolution < 32:
        raise ValueError(f"resolution={resolution} is too small to tell shapes apart; use >= 32")


def caption_for(scene: Scene, template: str | None = None) -> str:
    """Fill a caption template with a scene (the first matching template when ``template`` is None)."""
    if template is None:
        template = (TWO_OBJECT_TEMPLATES if scene.relation else ONE_OBJECT_TEMPLATES)[0]
    b = scene.objects[1].phrase if len(scene.objects) == 2 else ""
    return template.format(a=scene.objects[0].phrase, rel=scene.relation, b=b)


def _pick(rng: np.random.Generator, items: list | tuple) -> object:
    return items[rng.integers(len(items))]


def _sample_scene(split: Split, rng: np.random.Generator) -> Scene:
    all_pairs = [(c, s) for c in COLORS for s in SHAPES]
    seen = [pair for pair in all_pairs if pair not in HELDOUT_COMBINATIONS]
    heldout = sorted(HELDOUT_COMBINATIONS)  # sorted: set order is not stable across runs
    num_objects = 2 if rng.random() < _TWO_OBJECT_PROBABILITY else 1
    first_pool, other_pool = (heldout, all_pairs) if split == "heldout" else (seen, seen)
    pairs = [_pick(rng, first_pool)]
    if num_objects == 2:
        pairs.append(_pick(rng, other_pool))
        if split == "heldout" and rng.random() < 0.5:
            pairs.reverse()  # the held-out object is object 1 or object 2 with equal chance
    objects = [ShapeObject(c, s, _pick(rng, list(SIZES))) for c, s in pairs]
    if num_objects == 1:
        return Scene((objects[0],))
    if objects[0] == objects[1]:
        # Two identical objects make "A above A" ambiguous to score; flip the second one's size.
        flipped = "large" if objects[1].size == "small" else "small"
        objects[1] = ShapeObject(objects[1].color, objects[1].shape, flipped)
    return Scene(tuple(objects), str(_pick(rng, RELATIONS)))


def _layout(scene: Scene, rng: np.random.Generator, resolution: int) -> list[tuple[float, float, float]]:
    """Draw (centre x, centre y, side) per object, as fractions of the image side (y points down)."""
    sides = [float(rng.uniform(*SIZES[o.size])) for o in scene.objects]
    lo = [_MARGIN + s / 2 for s in sides]  # allowed centre range per object, on both axes
    hi = [1 - _MARGIN - s / 2 for s in sides]
    if len(sides) == 1:
        return [(float(rng.uniform(lo[0], hi[0])), float(rng.uniform(lo[0], hi[0])), sides[0])]
    # Work in (main, cross) coordinates: object `first` is the one with the smaller main coordinate.
    first = 0 if scene.relation in ("above", "to the left of") else 1
    second = 1 - first
    min_sep = (sides[0] + sides[1]) / 2 + max(_GAP, _GAP_PIXELS / resolution)
    max_sep = 1 - 2 * _MARGIN - (sides[0] + sides[1]) / 2
    sep = float(rng.uniform(min_sep, max_sep))
    main = [0.0, 0.0]
    main[first] = float(rng.uniform(lo[first], hi[second] - sep))
    main[second] = main[first] + sep
    # Across the relation's axis the centres differ by at most sep / 2, so the relation is never
    # ambiguous; the interval is never empty because sep / 2 > |side difference| / 2 for our sizes.
    cross = [0.0, 0.0]
    cross[first] = float(rng.uniform(lo[first], hi[first]))
    low, high = max(lo[second], cross[first] - sep / 2), min(hi[second], cross[first] + sep / 2)
    cross[second] = float(rng.uniform(low, high))
    vertical = scene.relation in ("above", "below")
    return [(c, m, s) if vertical else (m, c, s) for m, c, s in zip(main, cross, sides)]


def render(scene: Scene, rng: np.random.Generator, resolution: int = 64) -> Image.Image:
    """Render a scene at a random layout drawn from ``rng`` (see the module docstring for the rules).

    Args:
        scene: what to draw.
        rng: source of the position and size jitter.
        resolution: image side in pixels.

    Returns:
        An RGB image of ``resolution x resolution``.
    """
    big = resolution * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj, (cx, cy, side) in zip(scene.objects, _layout(scene, rng, resolution)):
        _draw_shape(draw, obj, cx * big, cy * big, side * big)
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: ShapeObject, cx: float, cy: float, side: float) -> None:
    color = COLORS[obj.color]
    x0, y0, x1, y1 = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=color)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=color)
    elif obj.shape == "triangle":  # isosceles, apex up: its mass sits low, unlike the other shapes
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=color)
    else:  # cross: arms one third of the side wide
        arm = side / 6
        draw.rectangle((cx - arm, y0, cx + arm, y1), fill=color)
        draw.rectangle((x0, cy - arm, x1, cy + arm), fill=color)


def _caption_pattern(template: str) -> re.Pattern[str]:
    phrase = rf"({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
    relation = "(" + "|".join(re.escape(r) for r in RELATIONS) + ")"
    parts = re.split(r"(\{a\}|\{b\}|\{rel\})", template)
    body = {"{a}": phrase, "{b}": phrase, "{rel}": relation}
    return re.compile("".join(body.get(p, re.escape(p)) for p in parts))


_PATTERNS = [(_caption_pattern(t), 1) for t in ONE_OBJECT_TEMPLATES] + [
    (_caption_pattern(t), 2) for t in TWO_OBJECT_TEMPLATES
]


def parse_caption(caption: str) -> Scene:
    """Recover the scene a caption describes; the inverse of the caption templates.

    Case, surrounding whitespace, repeated spaces and a trailing full stop are ignored.

    Raises:
        ValueError: the caption matches no template or names an unknown attribute.
    """
    text = " ".join(caption.lower().split()).rstrip(".").strip()
    for pattern, num_objects in _PATTERNS:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        groups = match.groups()
        if num_objects == 1:
            return Scene((ShapeObject(groups[1], groups[2], groups[0]),))
        first = ShapeObject(groups[1], groups[2], groups[0])
        second = ShapeObject(groups[5], groups[6], groups[4])
        return Scene((first, second), groups[3])
    raise ValueError(
        f"cannot parse caption {caption!r}: expected e.g. {caption_for(_EXAMPLE)!r} with sizes "
        f"{list(SIZES)}, colours {list(COLORS)}, shapes {list(SHAPES)} and relations {list(RELATIONS)}"
    )


_EXAMPLE = Scene((ShapeObject("red", "circle", "small"), ShapeObject("blue", "square", "large")), "above")
