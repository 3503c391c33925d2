"""The paper's augmentation recipes (PAPER.md A.6, B.7), checked by what they do to known images."""

import pytest
import torch
import torch.nn.functional as F

from lit_dalle.data.augment import CenterResize, DVAEAugment, PriorAugment, resize_square


def row_coded(height: int, width: int) -> torch.Tensor:
    """An image whose red channel encodes the source row (row // 2) and green the source column (col // 2)."""
    rows = (torch.arange(height) // 2).view(-1, 1).expand(height, width)
    cols = (torch.arange(width) // 2).view(1, -1).expand(height, width)
    return torch.stack([rows, cols, torch.zeros_like(rows)]).to(torch.uint8)


@pytest.mark.parametrize("recipe", [DVAEAugment, PriorAugment, CenterResize])
@pytest.mark.parametrize("size", [(64, 64), (100, 60), (40, 90), (20, 20), (300, 500)])
def test_output_is_square_uint8_at_the_resolution(recipe, size):
    out = recipe(32)(torch.randint(0, 256, (3, *size), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


def test_area_resize_is_box_averaging_when_shrinking():
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    expected = F.avg_pool2d(image[None].float(), 2)[0].round().to(torch.uint8)
    assert torch.equal(resize_square(image, 32), expected)


def test_prior_never_flips_and_dvae_flips_half_the_time():
    image = row_coded(64, 64)  # green grows left to right

    def flipped(recipe):
        return sum(
            int(out[1, :, 0].float().mean() > out[1, :, -1].float().mean()) for out in map(recipe, [image] * 300)
        )

    torch.manual_seed(0)
    assert flipped(PriorAugment(32)) == 0
    assert 110 < flipped(DVAEAugment(32)) < 190


def test_prior_crop_stays_near_the_centre_dvae_crop_anywhere():
    image = row_coded(400, 100)  # a tall image: the slack (300 rows) is along the height
    torch.manual_seed(0)
    prior_rows = [2 * PriorAugment(32)(image)[0].float().mean().item() for _ in range(200)]
    dvae_rows = [2 * DVAEAugment(32)(image)[0].float().mean().item() for _ in range(200)]
    # Listing 2: the square's offset is in [3 * 300 // 8, 5 * 300 // 8) = [112, 187); its centre row is offset + 50.
    assert 112 + 50 - 8 <= min(prior_rows) and max(prior_rows) <= 187 + 50 + 8
    # Listing 1: the square is anywhere: centre rows from ~50 to ~350.
    assert min(dvae_rows) < 90 and max(dvae_rows) > 310


def test_dvae_zoom_range_follows_listing_1():
    """At R = 32 the resize side is in [36, 48]: a 32-px crop spans between 2/3 and 8/9 of the square."""
    image = row_coded(256, 256)
    torch.manual_seed(0)
    spans = []
    for _ in range(200):
        rows = DVAEAugment(32, flip=False)(image)[0].float() * 2  # source row of each output pixel
        spans.append((rows[-1].mean() - rows[0].mean()).item() * 32 / 31 / 256)
    assert 2 / 3 - 0.04 < min(spans) and max(spans) < 8 / 9 + 0.04
    assert max(spans) - min(spans) > 0.15  # the size really is random


def test_center_resize_is_deterministic_and_centred():
    image = row_coded(300, 100)
    out = CenterResize(50)(image)
    assert torch.equal(out, CenterResize(50)(image))
    assert abs(2 * out[0].float().mean().item() - 150) < 2
