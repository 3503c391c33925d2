"""The embedded shapes generator: determinism, the held-out split, captions and the rendered layout."""

from __future__ import annotations

import numpy as np
import pytest

from lit_dalle.data.recognize import AttributeRecognizer, relation_between
from lit_dalle.data.shapes import (
    COLORS,
    HELDOUT_COMBINATIONS,
    ONE_OBJECT_TEMPLATES,
    RELATIONS,
    SHAPES,
    SIZES,
    TWO_OBJECT_TEMPLATES,
    Scene,
    ShapeObject,
    caption_for,
    generate,
    make_sample,
    parse_caption,
)


def pixels(sample) -> np.ndarray:
    return np.asarray(sample.image)


def test_vocabulary_is_separable() -> None:
    assert len(COLORS) >= 6 and len(SHAPES) == 4 and len(SIZES) == 2 and len(RELATIONS) == 4
    rgb = np.array(list(COLORS.values()), dtype=float)
    gaps = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e9
    assert gaps.min() > 100  # stays separable after a blurry decoder
    assert SIZES["small"][1] < SIZES["large"][0]  # size classes never overlap
    assert all(c in COLORS and s in SHAPES for c, s in HELDOUT_COMBINATIONS)
    # Every held-out colour and shape is still seen in training, only not together.
    seen = {(c, s) for c in COLORS for s in SHAPES} - HELDOUT_COMBINATIONS
    assert {c for c, _ in HELDOUT_COMBINATIONS} <= {c for c, _ in seen}
    assert {s for _, s in HELDOUT_COMBINATIONS} <= {s for _, s in seen}


@pytest.mark.parametrize("split", ["train", "val", "heldout"])
def test_sample_depends_only_on_split_seed_index(split: str) -> None:
    few = list(generate(split, 3, seed=7))
    many = list(generate(split, 12, seed=7))
    for a, b in zip(few, many):
        assert (a.key, a.caption, a.scene) == (b.key, b.caption, b.scene)
        assert np.array_equal(pixels(a), pixels(b))
    again = make_sample(split, 11, seed=7)
    assert again.caption == many[11].caption and np.array_equal(pixels(again), pixels(many[11]))
    assert len({s.key for s in many}) == 12 and many[5].key == f"{split}-0000005"
    other = list(generate(split, 12, seed=8))
    assert sum(np.array_equal(pixels(a), pixels(b)) for a, b in zip(many, other)) == 0


def test_splits_are_different_streams() -> None:
    train = [s.caption for s in generate("train", 20, seed=0)]
    val = [s.caption for s in generate("val", 20, seed=0)]
    assert train != val


@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_image_format(resolution: int) -> None:
    sample = make_sample("train", 3, resolution=resolution)
    assert sample.image.mode == "RGB" and sample.image.size == (resolution, resolution)
    assert sample.caption == sample.caption.lower()


def test_heldout_combinations_split() -> None:
    def pairs(scene: Scene) -> list[tuple[str, str]]:
        return [(o.color, o.shape) for o in scene.objects]

    for split in ("train", "val"):
        for sample in generate(split, 400, seed=3):
            assert not set(pairs(sample.scene)) & HELDOUT_COMBINATIONS, sample.caption
    heldout = list(generate("heldout", 400, seed=3))
    assert all(set(pairs(s.scene)) & HELDOUT_COMBINATIONS for s in heldout)
    # The split covers every held-out combination, in both object slots, alone and with a partner.
    assert {pairs(s.scene)[0] for s in heldout} >= HELDOUT_COMBINATIONS
    two = [s.scene for s in heldout if len(s.scene.objects) == 2]
    assert any(not o.is_heldout for scene in two for o in scene.objects)
    assert any(scene.objects[1].is_heldout and not scene.objects[0].is_heldout for scene in two)


def test_caption_round_trip_and_coverage() -> None:
    samples = list(generate("train", 300, seed=1)) + list(generate("heldout", 100, seed=1))
    for sample in samples:
        assert parse_caption(sample.caption) == sample.scene, sample.caption
        assert Scene.from_json(sample.scene.to_json()) == sample.scene
    captions = [s.caption for s in samples]
    templates = ONE_OBJECT_TEMPLATES + TWO_OBJECT_TEMPLATES
    used = {t for s in samples for t in templates if caption_for(s.scene, t) == s.caption}
    assert used == set(templates) and len(templates) >= 3
    assert all(c == c.lower() and "  " not in c for c in captions)
    assert {s.scene.relation for s in samples} == {None, *RELATIONS}
    assert {len(s.scene.objects) for s in samples} == {1, 2}


def test_parse_caption_is_lenient_on_form_strict_on_words() -> None:
    expected = Scene((ShapeObject("red", "circle", "small"), ShapeObject("blue", "square", "large")), "above")
    assert parse_caption("  A small RED circle   above a large blue square. ") == expected
    assert caption_for(expected) == "a small red circle above a large blue square"
    for bad in ("a small pink circle", "a red circle", "a small red circle near a large blue square", ""):
        with pytest.raises(ValueError, match="cannot parse caption"):
            parse_caption(bad)


def test_scene_validation() -> None:
    with pytest.raises(ValueError, match="color"):
        ShapeObject("pink", "circle", "small")
    obj = ShapeObject("red", "circle", "small")
    with pytest.raises(ValueError, match="relation"):
        Scene((obj, obj))
    with pytest.raises(ValueError, match="1 or 2"):
        Scene(())
    with pytest.raises(ValueError, match="not a serialised Scene"):
        Scene.from_json('{"objects": [{"color": "red"}]}')
    with pytest.raises(ValueError, match="split"):
        generate("test", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resolution"):
        generate("train", 1, resolution=16)


def test_rendered_relation_and_layout_agree_with_caption() -> None:
    """The recogniser's centres put object 1 where the caption says, with a clear margin."""
    recognizer = AttributeRecognizer()
    checked = 0
    for sample in generate("train", 200, seed=11):
        if sample.scene.relation is None:
            continue
        found = recognizer(sample.image).objects
        assert len(found) == 2, sample.caption  # the objects never touch
        by_attributes = {(o.color, o.shape, o.size): o for o in found}
        first, second = (by_attributes[(o.color, o.shape, o.size)] for o in sample.scene.objects)
        assert relation_between(first, second) == sample.scene.relation, sample.caption
        dx, dy = (abs(a - b) for a, b in zip(first.center, second.center))
        assert max(dx, dy) >= 1.9 * min(dx, dy)  # the relation's axis dominates
        checked += 1
    assert checked > 80


def test_sizes_render_within_their_class() -> None:
    recognizer = AttributeRecognizer()
    for sample in generate("val", 100, seed=2, resolution=128):
        for obj in recognizer(sample.image).objects:
            low, high = SIZES[obj.size]
            assert low - 0.02 < obj.side < high + 0.02
