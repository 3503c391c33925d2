"""lit_dalle: DALL-E ("Zero-Shot Text-to-Image Generation", Ramesh et al. 2021) as Lightning modules."""

__version__ = "0.1.0"

from lit_dalle.data import TextImageDataModule

__all__ = ["TextImageDataModule", "__version__"]
