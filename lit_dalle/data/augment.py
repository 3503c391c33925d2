"""The paper's two image augmentation recipes, at any target resolution.

Both take a uint8 [3, H, W] image and return a uint8 [3, R, R] one (R = ``resolution``).

- ``DVAEAugment`` is PAPER.md A.6 (Listing 1): a uniformly random square crop of side min(h, w), a resize
  to a random side t in [round(9/8 R), round(12/8 R)] (capped at the crop side), a random R x R crop and a
  random horizontal flip.
- ``PriorAugment`` is PAPER.md B.7 (Listing 2): a near-centre square crop (offset between 3/8 and 5/8 of
  the slack), a resize to t in [R, round(9/8 R)] (the paper's [256, 288] at R = 256), a random crop, and
  no flip, because images may contain text.
- ``CenterResize`` is the deterministic view used for validation and tokenization.

Resizing follows the paper's TensorFlow ``ResizeMethod.AREA`` when shrinking (exact box averaging,
``interpolate(mode="area")``) and is bilinear when enlarging (area resampling is undefined there); the
result is clipped, rounded and cast to uint8 as in the listings. Each recipe names the smallest image
side it can use (``min_side``), so large JPEGs can be decoded at a reduced DCT scale. Images smaller
than R are enlarged to R, where the listings would fail.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a square uint8 [3, s, s] image to [3, size, size] (area when shrinking), as uint8."""
    if image.shape[-1] == size and image.shape[-2] == size:
        return image
    x = image.unsqueeze(0).float()
    if size < image.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="area")
    else:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
    return x.clamp_(0, 255).round_().to(torch.uint8).squeeze(0)


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """A uniform integer in [low, high] inclusive."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _random_crop(image: torch.Tensor, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """A uniformly placed size x size crop of a square image at least that large."""
    side = image.shape[-1]
    top, left = _randint(0, side - size, generator), _randint(0, side - size, generator)
    return image[:, top : top + size, left : left + size]


class DVAEAugment:
    """PAPER.md A.6: random square crop, resize to [9/8, 12/8] x R, random crop, random flip.

    Args:
        resolution: the output side R (the paper: 256).
        min_scale: lower end of the resize range, as a multiple of R (the paper: 9/8).
        max_scale: upper end of the resize range, as a multiple of R (the paper: 12/8).
        flip: apply a random horizontal flip (the paper: yes).
    """

    def __init__(self, resolution: int, min_scale: float = 9 / 8, max_scale: float = 12 / 8, flip: bool = True) -> None:
        self.resolution, self.min_scale, self.max_scale, self.flip = resolution, min_scale, max_scale, flip
        self.min_side = round(max_scale * resolution)  # no decoded side smaller than this is ever needed

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment one uint8 [3, H, W] image into uint8 [3, R, R]."""
        height, width = image.shape[-2:]
        side = min(height, width)
        top, left = _randint(0, height - side, generator), _randint(0, width - side, generator)
        image = image[:, top : top + side, left : left + side]  # uniformly random square crop
        low = max(self.resolution, min(side, round(self.min_scale * self.resolution)))
        high = max(low, min(side, round(self.max_scale * self.resolution)))
        image = resize_square(image, _randint(low, high, generator))
        image = _random_crop(image, self.resolution, generator)
        if self.flip and _randint(0, 1, generator):
            image = image.flip(-1)
        return image.contiguous()


class PriorAugment:
    """PAPER.md B.7: near-centre square crop, resize to [1, 9/8] x R, random crop, no flip.

    Args:
        resolution: the output side R (the paper: 256).
        max_scale: upper end of the resize range as a multiple of R (the paper: 288 / 256 = 9/8).
    """

    def __init__(self, resolution: int, max_scale: float = 9 / 8) -> None:
        self.resolution, self.max_scale = resolution, max_scale
        self.min_side = round(max_scale * resolution)  # no decoded side smaller than this is ever needed

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment one uint8 [3, H, W] image into uint8 [3, R, R]."""
        height, width = image.shape[-2:]
        side = min(height, width)
        slack = max(height, width) - side
        # Listing 2: offset uniform in [3 * slack // 8, max(3 * slack // 8 + 1, 5 * slack // 8)).
        low = 3 * slack // 8
        offset = _randint(low, max(low + 1, 5 * slack // 8) - 1, generator)
        if height > width:
            image = image[:, offset : offset + side, :]
        else:
            image = image[:, :, offset : offset + side]
        high = max(self.resolution, min(side, round(self.max_scale * self.resolution)))
        image = resize_square(image, _randint(self.resolution, high, generator))
        return _random_crop(image, self.resolution, generator).contiguous()


class CenterResize:
    """The deterministic view: centre square crop, then an area resize to R x R.

    Args:
        resolution: the output side R.
    """

    def __init__(self, resolution: int) -> None:
        self.resolution = resolution
        self.min_side = resolution

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Crop the centre square of a uint8 [3, H, W] image and resize it to uint8 [3, R, R]."""
        height, width = image.shape[-2:]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return resize_square(image[:, top : top + side, left : left + side], self.resolution).contiguous()


AUGMENTATIONS = {"dvae": DVAEAugment, "prior": PriorAugment, "center": CenterResize}
"""Augmentation recipes by the name used in YAML (``TextImageDataModule(augment=...)``)."""
