"""A small CLIP-style contrastive model, trained on the same shards, for reranking where no CLIP is at hand.

The paper reranks N samples per caption with a pretrained contrastive model (CLIP; PAPER.md E.1). The
embedded dataset (and an offline machine) has none, so this module trains one: an image tower from
``timm`` (any architecture by name, random or from a local weights file), a text tower from
``transformers`` (a ``CLIPTextModel`` of the given size over our BPE, pooled at an end token), both
projected to a shared unit sphere, and the symmetric InfoNCE loss (Radford et al. 2021) with a learned
temperature. Captions that occur twice in a batch are both positives (short compositional captions repeat;
treating the copy as a negative would teach the model to tell identical captions apart).

Validation logs caption -> image retrieval: top-1 accuracy among pools of ``retrieval_pool`` images
(a hit when the best image's caption is the query caption). A checkpoint of this module is a scorer:
``lit_dalle.rerank.load_scorer("runs/clip/checkpoints/last.ckpt")``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_dalle.checkpoint import VersionedCheckpoint
from lit_dalle.text import TextTokenizer, read_captions, tokenizer_for_fit

__all__ = ["Contrastive", "contrastive_loss", "retrieval_top1"]


def contrastive_loss(logits: Tensor, captions: list[str]) -> Tensor:
    """Symmetric InfoNCE over a ``[B, B]`` image-by-text logit matrix; equal captions are all positives."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    group = torch.tensor([ids[c] for c in captions], device=logits.device)
    same = (group[:, None] == group[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)  # symmetric: rows are the text side's targets too
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def retrieval_top1(text: Tensor, image: Tensor, captions: list[str], pool: int = 100) -> Tensor:
    """Caption -> image top-1 accuracy among consecutive pools of ``pool`` pairs (unit embeddings ``[N, D]``).

    A query is right when the image it scores highest has the query's caption (pairs past the last full
    pool are left out). Returns a scalar tensor (NaN when there is no full pool).
    """
    hits, total = 0, 0
    for start in range(0, len(captions) - pool + 1, pool):
        sims = text[start : start + pool] @ image[start : start + pool].t()
        best = sims.argmax(dim=1).tolist()
        hits += sum(captions[start + q] == captions[start + b] for q, b in enumerate(best))
        total += pool
    return torch.tensor(hits / total if total else math.nan)


class Contrastive(VersionedCheckpoint, L.LightningModule):
    """CLIP-style image and text towers trained with symmetric InfoNCE and a learned temperature.

    Args:
        tokenizer: a caption tokenizer (tokenizer.json or a folder holding one); None trains one on the
            training captions when fit starts (saved beside the run and in every checkpoint).
        text_vocab: BPE vocabulary size (two more ids serve as end and pad tokens).
        text_len: token slots per caption, the end token included (longer captions are cut).
        bpe_dropout: BPE dropout in training.
        image_size: the side images are resized to before the image tower (linked to ``data.resolution``).
        image_model: a ``timm`` architecture name (``timm.list_models()``); ``test_resnet`` is ~0.4 M parameters.
        image_pretrained: a local weights file for ``image_model`` (timm's ``pretrained_cfg_overlay``); None
            starts from random weights. Nothing is downloaded.
        embed_dim: width of the shared embedding.
        text_width: hidden width of the text transformer.
        text_depth: layers of the text transformer.
        text_heads: attention heads of the text transformer.
        init_temperature: initial softmax temperature (CLIP: 0.07); learned, as log(1 / temperature).
        max_logit_scale: cap on 1 / temperature (CLIP: 100).
        lr: peak AdamW learning rate (linear warm-up, then cosine decay to 0 at the end of training).
        weight_decay: AdamW weight decay on matrices (not on gains, biases, embeddings or the temperature).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: linear warm-up updates.
        retrieval_pool: pool size of the validation retrieval accuracy.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        text_vocab: int = 512,
        text_len: int = 24,
        bpe_dropout: float = 0.0,
        image_size: int = 64,
        image_model: str = "test_resnet",
        image_pretrained: str | None = None,
        embed_dim: int = 128,
        text_width: int = 128,
        text_depth: int = 2,
        text_heads: int = 4,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 100,
        retrieval_pool: int = 100,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not (0 < init_temperature and 1 / init_temperature <= max_logit_scale):
            raise ValueError(
                f"need 0 < 1 / init_temperature <= max_logit_scale; got {init_temperature}, {max_logit_scale}"
            )
        self.image_tower = self.build_image_tower()
        self.text_tower = self.build_text_tower()
        self.text_projection = nn.Linear(text_width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        config = getattr(self.image_tower, "pretrained_cfg", {}) or {}  # the tower's input normalisation
        for name, default in (("mean", 0.5), ("std", 0.5)):
            value = torch.tensor(config.get(name, (default,) * 3)).view(1, 3, 1, 1)
            self.register_buffer(f"pixel_{name}", value, persistent=False)
        self.text_tokenizer: TextTokenizer | None = None
        self._val: list[tuple[Tensor, Tensor, list[str]]] = []

    # -- towers (hooks) ------------------------------------------------------------------------------

    def build_image_tower(self) -> nn.Module:
        """Hook: the image tower, images ``[B, 3, S, S]`` (normalised) -> ``[B, embed_dim]``; a timm model here."""
        import timm

        overlay = {"file": self.hparams.image_pretrained} if self.hparams.image_pretrained else None
        return timm.create_model(
            self.hparams.image_model,
            pretrained=overlay is not None,
            pretrained_cfg_overlay=overlay,
            num_classes=self.hparams.embed_dim,
        )

    def build_text_tower(self) -> nn.Module:
        """Hook: the text tower, a ``transformers.CLIPTextModel`` over our BPE ids plus end and pad ids."""
        from transformers import CLIPTextConfig, CLIPTextModel

        hp = self.hparams
        config = CLIPTextConfig(
            vocab_size=hp.text_vocab + 2, hidden_size=hp.text_width, intermediate_size=4 * hp.text_width,
            num_hidden_layers=hp.text_depth, num_attention_heads=hp.text_heads, max_position_embeddings=hp.text_len,
            eos_token_id=hp.text_vocab, pad_token_id=hp.text_vocab + 1, bos_token_id=hp.text_vocab + 1,
        )  # fmt: skip
        return CLIPTextModel(config)

    # -- embeddings ----------------------------------------------------------------------------------

    def _tokenizer(self) -> TextTokenizer:
        if self.text_tokenizer is None and self.hparams.tokenizer:
            self.text_tokenizer = TextTokenizer.load(self.hparams.tokenizer, self.hparams.bpe_dropout)
        if self.text_tokenizer is None:
            raise ValueError("no caption tokenizer yet: set model.tokenizer or load a trained checkpoint")
        if self.text_tokenizer.vocab_size > self.hparams.text_vocab:
            raise ValueError(
                f"the tokenizer has {self.text_tokenizer.vocab_size} ids but model.text_vocab="
                f"{self.hparams.text_vocab}; raise model.text_vocab to at least the tokenizer's size"
            )
        return self.text_tokenizer

    def embed_texts(self, captions: list[str], train: bool = False) -> Tensor:
        """Unit text embeddings ``[B, embed_dim]`` of captions."""
        ids, valid = self._tokenizer().encode(captions, self.hparams.text_len - 1, train=train)
        end = self.hparams.text_vocab
        ids = torch.cat([ids.masked_fill(~valid, end + 1), torch.full_like(ids[:, :1], end + 1)], dim=1)
        ids[torch.arange(len(captions)), valid.sum(dim=1)] = end  # the end token after the last real one
        mask = torch.cat([valid, valid[:, :1]], dim=1)
        mask[torch.arange(len(captions)), valid.sum(dim=1)] = True
        out = self.text_tower(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return F.normalize(self.text_projection(out.pooler_output), dim=-1)

    def embed_images(self, images: Tensor) -> Tensor:
        """Unit image embeddings ``[B, embed_dim]`` of images ``[B, 3, H, W]`` in [0, 1] (resized if needed)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] in [0, 1]; got shape {tuple(images.shape)}")
        images = images.to(self.device, torch.float32)
        size = self.hparams.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return F.normalize(self.image_tower((images - self.pixel_mean) / self.pixel_std), dim=-1)

    @torch.no_grad()
    def score(self, captions: list[str], images: Tensor) -> Tensor:
        """Cosine similarity ``[B]`` of each (caption, image) pair: the reranking score."""
        return (self.embed_texts(captions) * self.embed_images(images)).sum(dim=-1)

    def forward(self, captions: list[str], images: Tensor) -> tuple[Tensor, Tensor]:
        """Unit text and image embeddings of a batch of pairs."""
        return self.embed_texts(captions, train=self.training), self.embed_images(images)

    # -- training ------------------------------------------------------------------------------------

    def train_tokenizer(self, shards: list[str]) -> TextTokenizer:
        """Train the caption BPE on the captions of ``shards`` (what `on_fit_start` does when none is given)."""
        return TextTokenizer.train(read_captions(shards), self.hparams.text_vocab, dropout=self.hparams.bpe_dropout)

    def on_fit_start(self) -> None:
        """Load the given tokenizer, or train one on the training captions."""
        if self.text_tokenizer is None and not self.hparams.tokenizer:
            shards = getattr(getattr(self.trainer, "datamodule", None), "shards", {}).get("train", [])
            dropout = self.hparams.bpe_dropout
            self.text_tokenizer = tokenizer_for_fit(self.trainer, shards, self.train_tokenizer, dropout)
        self._tokenizer()

    def _loss(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        text, image = self(batch["caption"], batch["image"])
        scale = self.logit_scale.clamp(max=math.log(self.hparams.max_logit_scale)).exp()
        return contrastive_loss(scale * image @ text.t(), list(batch["caption"])), text, image

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """InfoNCE on a batch of (caption, image) pairs."""
        loss, _, _ = self._loss(batch)
        size = len(batch["caption"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        temperature = 1 / self.logit_scale.exp().clamp(max=self.hparams.max_logit_scale)
        self.log("train/temperature", temperature, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Validation loss; embeddings kept for the retrieval accuracy at epoch end."""
        loss, text, image = self._loss(batch)
        self.log("val/loss", loss, sync_dist=True, batch_size=len(batch["caption"]))
        self._val.append((text.cpu(), image.cpu(), list(batch["caption"])))

    def on_validation_epoch_end(self) -> None:
        """Log caption -> image top-1 retrieval among pools of ``retrieval_pool`` (when a full pool was seen)."""
        if self._val:
            text = torch.cat([t for t, _, _ in self._val])
            image = torch.cat([i for _, i, _ in self._val])
            captions = [c for _, _, cs in self._val for c in cs]
            accuracy = retrieval_top1(text, image, captions, self.hparams.retrieval_pool)
            if not accuracy.isnan():
                self.log(f"val/retrieval_top1_of_{self.hparams.retrieval_pool}", accuracy, sync_dist=True)
        self._val.clear()

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (no decay on gains, biases, embeddings, temperature), linear warm-up then cosine decay."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            (decay if param.ndim >= 2 and "embed" not in name else no_decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps,
        )  # fmt: skip
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams.warmup_steps, total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints ---------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the library version and the caption tokenizer beside the weights."""
        super().on_save_checkpoint(checkpoint)
        tokenizer = self.text_tokenizer.to_str() if self.text_tokenizer is not None else None
        checkpoint["lit_dalle_contrastive"] = {"tokenizer": tokenizer}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the library version, then restore the caption tokenizer."""
        super().on_load_checkpoint(checkpoint)
        tokenizer = checkpoint.get("lit_dalle_contrastive", {}).get("tokenizer")
        if tokenizer:
            self.text_tokenizer = TextTokenizer.from_str(tokenizer, self.hparams.bpe_dropout)
