"""The text-to-image Prior of DALL-E as a LightningModule (Ramesh et al. 2021, Sec. 2.2, App. B; PAPER.md B).

A decoder-only sparse transformer (`lit_dalle.models.transformer`) models [caption BPE tokens][image
tokens] as one stream with the paper's row / column / convolutional masks. Training minimises
``(1/8) CE_text + (7/8) CE_image``, each averaged over its own tokens (PAPER.md B.5; the text loss skips
pad slots). Image tokens come from a frozen DVAE on the fly, or from pre-tokenized shards
(`python -m lit_dalle tokenize`); the DVAE is never part of this module's state: the Prior records which
one it was trained with (path, content hash, codebook size, downsampling) and refuses another.

The caption tokenizer is trained on the training captions when fit starts (unless a path is given),
saved as ``tokenizer.json`` in the run folder, and stored in every checkpoint, so a checkpoint alone
generates. Optimisation (PAPER.md B.6): AdamW(0.9, 0.96, 1e-8) with weight decay 4.5e-2 on matrices only
(not on gains, biases or embeddings), clipping at norm 4 (``trainer.gradient_clip_val``), warm-up and
halving on plateau (`lit_dalle.callbacks.WarmupHalveOnPlateau`), EMA 0.99 every 25 updates
(`lit_dalle.callbacks.EMA`).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_dalle.checkpoint import VersionedCheckpoint
from lit_dalle.image_tokens import DVAERecord, load_frozen_dvae, read_manifest
from lit_dalle.models.transformer import TEXT_PAD, Transformer, TransformerConfig
from lit_dalle.text import TextTokenizer, read_captions, tokenizer_for_fit

__all__ = ["Prior"]


class Prior(VersionedCheckpoint, L.LightningModule):
    """The paper's transformer prior over [text][image] tokens, with training, the DVAE link and generation.

    Args:
        dvae: the frozen DVAE checkpoint that turns images into tokens (and tokens back into images).
        tokenizer: a caption tokenizer (tokenizer.json or a folder holding one); None trains one on the
            training captions when fit starts.
        text_vocab: text vocabulary size of the model (and of the tokenizer trained when none is given).
        text_len: text slots L; longer captions are cut (the paper: 256).
        bpe_dropout: BPE dropout in training (the paper: 0.1).
        image_size: side of the images the DVAE encodes (linked to ``data.resolution`` by the CLI).
        image_vocab: DVAE codebook size (checked against the DVAE).
        downsample: pixels per image token along a side (checked against the DVAE); grid = image_size / downsample.
        depth: transformer layers (two resblocks each).
        width: model width.
        heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of width.
        dropout: dropout on embeddings and residual branches (the paper: none).
        mask_schedule: mask kind per layer: "paper", one kind for all ("row", "column", "conv", "full"), or a list.
        conv_kernel: side of the convolutional mask (the paper: 11).
        attention_backend: "sdpa", "flex" or "auto" (flex on CUDA).
        text_loss_weight: weight of the text cross-entropy (PAPER.md B.5: 1/8).
        image_loss_weight: weight of the image cross-entropy (PAPER.md B.5: 7/8).
        lr: initial learning rate (a schedule callback sets it every step).
        betas: AdamW betas (PAPER.md B.6: 0.9, 0.96).
        eps: AdamW epsilon (PAPER.md B.6: 1e-8).
        weight_decay: decoupled weight decay on weight matrices (PAPER.md B.6: 4.5e-2).
        optimizer: "adamw" (torch) or "adamw8bit" (bitsandbytes 8-bit states).
    """

    def __init__(
        self,
        dvae: str | None = None,
        tokenizer: str | None = None,
        text_vocab: int = 16384,
        text_len: int = 256,
        bpe_dropout: float = 0.1,
        image_size: int = 256,
        image_vocab: int = 8192,
        downsample: int = 8,
        depth: int = 64,
        width: int = 3968,
        heads: int = 62,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        mask_schedule: str | list[str] = "paper",
        conv_kernel: int = 11,
        attention_backend: Literal["auto", "sdpa", "flex"] = "auto",
        text_loss_weight: float = 1 / 8,
        image_loss_weight: float = 7 / 8,
        lr: float = 4.5e-4,
        betas: tuple[float, float] = (0.9, 0.96),
        eps: float = 1e-8,
        weight_decay: float = 4.5e-2,
        optimizer: Literal["adamw", "adamw8bit"] = "adamw",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if image_size % downsample:
            raise ValueError(f"image_size={image_size} must be a multiple of downsample={downsample}")
        self.grid = image_size // downsample
        schedule = mask_schedule if isinstance(mask_schedule, str) else tuple(mask_schedule)
        self.config = TransformerConfig(
            text_vocab=text_vocab, image_vocab=image_vocab, text_len=text_len, grid=self.grid, depth=depth,
            width=width, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout, mask_schedule=schedule,
            conv_kernel=conv_kernel, attention_backend=attention_backend,
        )  # fmt: skip
        self.transformer = self.build_transformer(self.config)
        self.text_tokenizer: TextTokenizer | None = None  # from model.tokenizer, a checkpoint, or trained at fit start
        self.dvae_record: DVAERecord | None = None  # the DVAE this Prior was (or is being) trained with
        # A plain dict keeps the DVAE out of the module tree: not in state_dict, not moved, not trained.
        self._frozen: dict[str, nn.Module] = {}
        self._record_origin = "this Prior was trained with"

    def build_transformer(self, config: TransformerConfig) -> Transformer:
        """Hook: the network over the text-image stream, built once in ``__init__``.

        Override it to change the architecture while keeping this module's training, checkpoints and
        generation: return a `Transformer` subclass (e.g. one overriding how its layers are built) or any
        module with the same ``forward(text, image)`` and ``generate_image_tokens`` interface. Example::

            class WiderMLP(Prior):
                def build_transformer(self, config):
                    return Transformer(dataclasses.replace(config, mlp_ratio=8.0))
        """
        return Transformer(config)

    # -- the tokenizers ------------------------------------------------------------------------------

    def _check_tokenizer(self, tokenizer: TextTokenizer) -> None:
        if tokenizer.vocab_size > self.hparams.text_vocab:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but model.text_vocab={self.hparams.text_vocab}; "
                "raise model.text_vocab to at least the tokenizer's size"
            )

    def _load_tokenizer(self) -> TextTokenizer:
        tokenizer = TextTokenizer.load(self.hparams.tokenizer, self.hparams.bpe_dropout)
        self._check_tokenizer(tokenizer)
        return tokenizer

    def train_tokenizer(self, shards: list[str], max_captions: int = 1_000_000) -> TextTokenizer:
        """Train the caption BPE on the captions of ``shards`` (what `on_fit_start` does when none is given)."""
        tokenizer = TextTokenizer.train(
            read_captions(shards, max_captions), self.hparams.text_vocab, dropout=self.hparams.bpe_dropout
        )
        self._check_tokenizer(tokenizer)
        return tokenizer

    @property
    def dvae(self) -> nn.Module:
        """The frozen DVAE (loaded from ``hparams.dvae`` on first use and checked against the record)."""
        if "dvae" not in self._frozen:
            if not self.hparams.dvae:
                raise ValueError(
                    "this Prior needs a DVAE to encode images or decode samples: set model.dvae to its checkpoint "
                    "(train one with `python -m lit_dalle fit --config configs/dvae.yaml`)"
                )
            dvae, record = load_frozen_dvae(self.hparams.dvae)
            self.check_dvae(record)
            self._frozen["dvae"], self.dvae_record = dvae, record
        dvae = self._frozen["dvae"]
        if dvae.device != self.device:  # type: ignore[comparison-overlap]
            dvae.to(self.device)
        return dvae

    def check_dvae(self, record: DVAERecord, what: str = "model.dvae") -> None:
        """Refuse a DVAE (or tokens made by one) that differs from this Prior's, saying what differs."""
        if record.vocab_size != self.hparams.image_vocab or record.downsample != self.hparams.downsample:
            raise ValueError(
                f"{what} ({record.path}) has a codebook of {record.vocab_size} and downsampling {record.downsample}, "
                f"but this Prior has image_vocab={self.hparams.image_vocab}, downsample={self.hparams.downsample}"
            )
        if self.dvae_record is not None and (diff := self.dvae_record.mismatch(record)):
            raise ValueError(
                f"{what} ({record.path}) is not the DVAE {self._record_origin} ({self.dvae_record.path}): "
                f"{diff}. Use that checkpoint, or train a new Prior (or tokenize again) for this DVAE."
            )

    # -- setup ---------------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        """Check pre-tokenized data against the DVAE; train and save the caption tokenizer if there is none."""
        datamodule = getattr(self.trainer, "datamodule", None)
        shards = getattr(datamodule, "shards", {}).get("train", [])
        manifest = read_manifest(shards[0]) if shards else None
        if manifest is not None:
            record = DVAERecord(**manifest["dvae"])
            self.check_dvae(record, what=f"the pre-tokenized shards' DVAE ({shards[0]})")
            if self.dvae_record is None:
                self.dvae_record, self._record_origin = record, f"the pre-tokenized shards ({shards[0]}) were made with"
        if manifest is None or self.hparams.dvae:
            _ = self.dvae  # load, check and record the DVAE now: a wrong one fails before the first step
        if self.text_tokenizer is None and self.hparams.tokenizer:
            self.text_tokenizer = self._load_tokenizer()
        if self.text_tokenizer is None:
            self.text_tokenizer = tokenizer_for_fit(
                self.trainer, shards, self.train_tokenizer, self.hparams.bpe_dropout
            )
            self._check_tokenizer(self.text_tokenizer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the library version, the caption tokenizer and the DVAE record beside the weights."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["lit_dalle_prior"] = {
            "tokenizer": self.text_tokenizer.to_str() if self.text_tokenizer is not None else None,
            "dvae": asdict(self.dvae_record) if self.dvae_record is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the library version, then restore the caption tokenizer and the DVAE record."""
        super().on_load_checkpoint(checkpoint)
        extra = checkpoint.get("lit_dalle_prior", {})
        if extra.get("tokenizer"):
            self.text_tokenizer = TextTokenizer.from_str(extra["tokenizer"], self.hparams.bpe_dropout)
        if extra.get("dvae"):
            self.dvae_record = DVAERecord(**extra["dvae"])

    # -- training ------------------------------------------------------------------------------------

    def encode_text(self, captions: list[str], train: bool = False) -> Tensor:
        """Caption ids ``[B, L]`` on this module's device, `TEXT_PAD` past each caption."""
        if self.text_tokenizer is None and self.hparams.tokenizer:
            self.text_tokenizer = self._load_tokenizer()
        if self.text_tokenizer is None:
            raise ValueError("no caption tokenizer yet: set model.tokenizer or load a trained checkpoint")
        ids, valid = self.text_tokenizer.encode(captions, self.hparams.text_len, train=train)
        return ids.masked_fill(~valid, TEXT_PAD).to(self.device)

    def image_tokens(self, batch: dict[str, Any]) -> Tensor:
        """Image tokens ``[B, N]`` of a batch: pre-tokenized, or encoded by the frozen DVAE."""
        tokens = batch["image_tokens"] if "image_tokens" in batch else self.dvae.encode(batch["image"])
        if tokens.shape[-2:] != (self.grid, self.grid):
            raise ValueError(
                f"image tokens form a {tuple(tokens.shape[-2:])} grid but this Prior expects {self.grid}x{self.grid} "
                f"(model.image_size={self.hparams.image_size} / downsample={self.hparams.downsample}); check "
                "data.resolution and the DVAE"
            )
        return tokens.flatten(1).long()

    def loss(self, text: Tensor, image: Tensor) -> dict[str, Tensor]:
        """Hook: the paper's loss, (1/8) text CE + (7/8) image CE, each a mean over its own tokens (PAPER.md B.5).

        Override it to weight tokens differently (e.g. by image row, or a text loss over pads too); return
        a dict with at least ``loss`` (every entry is logged under ``train/``, ``val/``, ``test/``). Example::

            class RowWeighted(Prior):
                def loss(self, text, image):
                    out = super().loss(text, image)
                    ...
                    return out
        """
        text_logits, image_logits = self.transformer(text, image)  # [B, L, Vt], [B, N, Vi], fp32
        text_ce = F.cross_entropy(text_logits.flatten(0, 1), text.flatten(), ignore_index=TEXT_PAD)
        image_ce = F.cross_entropy(image_logits.flatten(0, 1), image.flatten())
        loss = self.hparams.text_loss_weight * text_ce + self.hparams.image_loss_weight * image_ce
        return {"loss": loss, "loss_text": text_ce, "loss_image": image_ce}

    def _step(self, batch: dict[str, Any], stage: str) -> Tensor:
        image = self.image_tokens(batch)
        text = self.encode_text(batch["caption"], train=stage == "train")
        losses = self.loss(text, image)
        self.log_dict(
            {f"{stage}/{name}": value for name, value in losses.items()},
            prog_bar=stage == "train", sync_dist=stage != "train", batch_size=image.shape[0],
        )  # fmt: skip
        return losses["loss"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """One update's loss on a batch of captions and images (or image tokens)."""
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Validation losses (deterministic text encoding)."""
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Test losses."""
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW with weight decay except on gains, biases and embeddings (PAPER.md B.6)."""
        exempt = self.transformer.no_decay_parameter_names()
        decay, no_decay = [], []
        for name, param in self.transformer.named_parameters():
            (no_decay if name in exempt else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        kwargs = {"lr": self.hparams.lr, "betas": tuple(self.hparams.betas), "eps": self.hparams.eps}
        if self.hparams.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError as err:  # pragma: no cover - bitsandbytes is a Linux dependency
                raise ImportError("model.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes)") from err
            return bnb.optim.AdamW8bit(groups, **kwargs)
        return torch.optim.AdamW(groups, **kwargs)

    # -- generation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_tokens(
        self,
        captions: list[str],
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        image_prefix: Tensor | None = None,
    ) -> Tensor:
        """Sample image tokens ``[B, grid, grid]`` for captions with the KV cache (PAPER.md E.1: t = 1, no top-k/p).

        Args:
            captions: B captions (repeat a caption for several samples).
            temperature: softmax temperature (0: greedy).
            top_k: keep only the k most likely tokens per step.
            top_p: nucleus sampling threshold.
            seed: seed of the sampling generator (reproducible samples).
            image_prefix: ``[B, n]`` known first tokens (e.g. the first R rows of a real image's tokens).
        """
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        text = self.encode_text(captions)
        prefix = image_prefix.to(self.device).flatten(1) if image_prefix is not None else None
        tokens = self.transformer.generate_image_tokens(
            text, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, image_prefix=prefix
        )
        return tokens.view(-1, self.grid, self.grid)

    @torch.no_grad()
    def generate(self, captions: list[str], **kwargs: Any) -> Tensor:
        """Sample images ``[B, 3, H, W]`` in [0, 1] for captions (see `generate_tokens` for the options)."""
        return self.dvae.decode(self.generate_tokens(captions, **kwargs))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Generate one image for each caption of the batch."""
        return {"key": batch.get("key"), "caption": batch["caption"], "image": self.generate(batch["caption"])}
