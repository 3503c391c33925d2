"""Contrastive scorers for reranking samples (PAPER.md E.1): a Hugging Face CLIP, or our `Contrastive` model.

A scorer embeds captions and images into one unit sphere; the score of a (caption, image) pair is their
cosine similarity. `load_scorer` takes either

- a folder written by ``CLIPModel.save_pretrained`` + ``CLIPProcessor.save_pretrained`` (or a hub id such as
  ``openai/clip-vit-base-patch32``, which `transformers` downloads unless it is cached; nothing in this
  library's tests or configs downloads), or
- a checkpoint of `lit_dalle.contrastive.Contrastive` (``fit --config configs/clip.yaml``), with its EMA
  weights when the checkpoint has them.

Both score without gradients, in batches, on the device they were loaded to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["HFCLIPScorer", "Scorer", "caption_scores", "clip_score", "load_scorer", "rank"]


@runtime_checkable
class Scorer(Protocol):
    """What reranking needs: unit embeddings of captions and of images ``[B, 3, H, W]`` in [0, 1]."""

    def embed_texts(self, captions: list[str]) -> Tensor:
        """Unit text embeddings ``[B, D]``."""
        ...

    def embed_images(self, images: Tensor) -> Tensor:
        """Unit image embeddings ``[B, D]``."""
        ...

    def score(self, captions: list[str], images: Tensor) -> Tensor:
        """Cosine similarity ``[B]`` of each (caption, image) pair."""
        ...


class HFCLIPScorer:
    """A Hugging Face ``CLIPModel`` with its processor, as a `Scorer`.

    Args:
        path: a local folder (``save_pretrained`` of the model and of its ``CLIPProcessor``) or a hub id.
        device: where to run.
        batch_size: pairs embedded at once.
    """

    def __init__(self, path: str, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        from transformers import CLIPModel, CLIPProcessor

        local = Path(path).is_dir()
        self.model = CLIPModel.from_pretrained(path, local_files_only=local).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=local)
        self.device, self.batch_size = torch.device(device), batch_size

    @staticmethod
    def _features(out: object) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output  # transformers 5 returns an output object

    @torch.no_grad()
    def embed_texts(self, captions: list[str]) -> Tensor:
        """Unit text embeddings ``[B, D]``."""
        chunks = []
        for start in range(0, len(captions), self.batch_size):
            inputs = self.processor.tokenizer(
                captions[start : start + self.batch_size], padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            chunks.append(self._features(self.model.get_text_features(**inputs)))
        return F.normalize(torch.cat(chunks).float(), dim=-1)

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """Unit image embeddings ``[B, D]`` of images ``[B, 3, H, W]`` in [0, 1] (the processor resizes them)."""
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = [image for image in images[start : start + self.batch_size].float().clamp(0, 1).cpu()]
            pixels = self.processor.image_processor(images=batch, do_rescale=False, return_tensors="pt")
            pixel_values = pixels["pixel_values"].to(self.device, self.model.dtype)
            chunks.append(self._features(self.model.get_image_features(pixel_values=pixel_values)))
        return F.normalize(torch.cat(chunks).float(), dim=-1)

    def score(self, captions: list[str], images: Tensor) -> Tensor:
        """Cosine similarity ``[B]`` of each (caption, image) pair."""
        return (self.embed_texts(captions) * self.embed_images(images)).sum(dim=-1)


def load_scorer(path: str, device: str | torch.device = "cpu") -> Scorer:
    """A `Scorer` from a Hugging Face CLIP folder (or hub id) or a `Contrastive` checkpoint file.

    Raises:
        FileNotFoundError: the path is neither a file, a folder, nor shaped like a hub id (``org/name``).
    """
    file = Path(path)
    if file.is_dir():
        if not (file / "config.json").is_file():
            raise FileNotFoundError(
                f"--rerank {path!r} is a folder without config.json: give a CLIPModel.save_pretrained folder "
                "or a Contrastive checkpoint (fit --config configs/clip.yaml)"
            )
        return HFCLIPScorer(path, device)
    if file.is_file():
        from lit_dalle.callbacks.ema import load_with_ema
        from lit_dalle.contrastive import Contrastive

        return load_with_ema(Contrastive, path).to(device)  # type: ignore[return-value]
    if path.count("/") == 1 and not path.startswith((".", "/")) and not path.endswith(".ckpt"):
        return HFCLIPScorer(path, device)  # a hub id: transformers downloads it unless it is cached
    raise FileNotFoundError(
        f"--rerank {path!r} not found: give a Contrastive checkpoint (train one with `python -m lit_dalle fit "
        "--config configs/clip.yaml`) or a folder holding a Hugging Face CLIP (CLIPModel + CLIPProcessor)"
    )


@torch.no_grad()
def caption_scores(scorer: Scorer, caption: str, images: Tensor, batch_size: int = 64) -> Tensor:
    """Cosine similarity ``[N]`` of one caption with each of N images ``[N, 3, H, W]`` (the caption embedded once)."""
    text = scorer.embed_texts([caption])[0]
    return torch.cat(
        [scorer.embed_images(images[s : s + batch_size]) @ text for s in range(0, len(images), batch_size)]
    )


def rank(scorer: Scorer, caption: str, images: Tensor, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """Order N images ``[N, 3, H, W]`` of one caption best first: (indices ``[N]``, scores ``[N]`` in that order)."""
    scores = caption_scores(scorer, caption, images, batch_size)
    order = scores.argsort(descending=True)
    return order, scores[order]


@torch.no_grad()
def clip_score(scorer: Scorer, captions: list[str], images: Tensor, batch_size: int = 64) -> Tensor:
    """CLIP score (Hessel et al. 2021, as torchmetrics defines it): mean of 100 * max(cos, 0) over the pairs."""
    scores = [
        scorer.score(captions[s : s + batch_size], images[s : s + batch_size])
        for s in range(0, len(captions), batch_size)
    ]
    return clip_score_of(torch.cat(scores))


def clip_score_of(cosines: Tensor) -> Tensor:
    """CLIP score of pairs whose cosine similarities are already known: mean of 100 * max(cos, 0)."""
    return 100 * cosines.clamp(min=0).mean()
