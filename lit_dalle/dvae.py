"""The discrete VAE of DALL-E as a LightningModule (Ramesh et al. 2021, Sec. 2.1, App. A; PAPER.md A).

Training maximises the relaxed evidence lower bound with a beta-weighted KL (PAPER.md A.3):

- the encoder's logits at each of the h x w positions parameterise q(z | x); a Gumbel-softmax sample at
  temperature tau (soft, not straight-through) goes to the decoder;
- the decoder's output is a logit-Laplace density over the pixels, mapped to (eps, 1 - eps) by
  phi(x) = (1 - 2 eps) x + eps with eps = 0.1 (PAPER.md A.4, Eqs. 2 and 3);
- the KL of softmax(logits) to the uniform prior is taken at each position from the logits, not from the
  relaxed sample.

The schedules of beta (`kl_weight`), tau (`temperature`) and the learning rate, and the EMA of the
weights, are callbacks (`lit_dalle.callbacks`). Tokens for the Prior are the argmax of the logits
(`encode`); `decode` maps tokens back to images in [0, 1].
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn
from torchmetrics.image import PeakSignalNoiseRatio

from lit_dalle.checkpoint import CHECKPOINT_FORMAT, VersionedCheckpoint
from lit_dalle.models.dvae import PRESETS, Decoder, Encoder, read_openai_checkpoint

__all__ = ["DVAE", "CodebookUsage", "convert_openai"]


class CodebookUsage(torchmetrics.Metric):
    """Histogram of the codes used: perplexity exp(H(counts)) and the fraction of codes used at least once."""

    full_state_update = False

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.add_state("counts", torch.zeros(vocab_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, tokens: Tensor) -> None:
        """Count the code ids in tokens (any shape)."""
        self.counts += torch.bincount(tokens.flatten(), minlength=self.counts.numel())

    def compute(self) -> dict[str, Tensor]:
        """Perplexity and fraction of codes used."""
        p = self.counts.float() / self.counts.sum().clamp_min(1)
        entropy = -(p * p.clamp_min(1e-30).log()).sum()
        return {"perplexity": entropy.exp(), "used": (self.counts > 0).float().mean()}


class DVAE(VersionedCheckpoint, L.LightningModule):
    """The paper's dVAE: encoder, decoder, relaxed-ELB training, metrics and the token API.

    Loss normalisation, generalised from 256 px (PAPER.md A.3): with D = C * H * W pixel values per image
    and h * w = (H / f) * (W / f) token positions (f = 2**(group_count - 1)), the per-image loss is

        loss = (sum of the D logit-Laplace NLLs + beta * sum of the h*w KLs) / D
             = mean NLL per value + beta / (C * f**2) * mean KL per position,

    which is the paper's beta / 192 for C = 3, f = 8, at any H, W. The logged `elb_bpd` is the true ELB
    (beta = 1) in bits per dimension of the 8-bit pixel scale: (NLL + KL) / D / ln 2 plus the log-Jacobian
    of phi, log2(255 / (1 - 2 eps)).

    Args:
        vocab_size: codebook size K.
        n_hid: width of the first encoder / last decoder group (groups widen by 2x each).
        group_count: number of groups; images are downsampled by 2**(group_count - 1).
        n_blk_per_group: resblocks per group.
        n_init: width of the decoder's input 1x1 conv (the codebook embedding).
        channels: image channels.
        n_layers: depth for post_gain = 1 / n_layers**2; None: group_count * n_blk_per_group.
        kl_weight: beta; the `KLWeightSchedule` callback anneals it (its paper start value, A.5).
        temperature: Gumbel-softmax tau; the `TemperatureSchedule` callback anneals it (paper start, A.5).
        lr: AdamW learning rate; the `LearningRateSchedule` callback anneals it (paper start, A.5).
        betas: AdamW betas (A.5).
        eps: AdamW epsilon (A.5).
        weight_decay: AdamW weight decay (A.5).
        logit_laplace_eps: eps of the pixel map phi (A.4, Eq. 3).
        min_log_scale: floor on the decoder's ln b (None: none, as in the paper). On data with exactly flat
            regions (the embedded dataset's plain background) the continuous logit-Laplace density is
            unbounded: b shrinks towards 0 there, the NLL of those pixels dominates the loss, and their
            1 / b gradients dominate Adam's normaliser, so the few object pixels (their colours) stop being
            learned. A floor (as PixelCNN++ puts on its log-scales) bounds both; see configs/dvae.yaml.
        num_logged_images: originals and reconstructions in the validation image grid (0: none).
        channels_last: keep weights and activations channels-last (NHWC) from `setup` on: faster
            convolutions with oneDNN on CPUs (~1.3x measured here) and with tensor cores on GPUs.
    """

    def __init__(
        self,
        vocab_size: int = 8192,
        n_hid: int = 256,
        group_count: int = 4,
        n_blk_per_group: int = 2,
        n_init: int = 128,
        channels: int = 3,
        n_layers: int | None = None,
        kl_weight: float = 0.0,
        temperature: float = 1.0,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-4,
        logit_laplace_eps: float = 0.1,
        min_log_scale: float | None = None,
        num_logged_images: int = 8,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= logit_laplace_eps < 0.5:
            raise ValueError(f"logit_laplace_eps={logit_laplace_eps} must be in [0, 0.5); the paper uses 0.1")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0 (Gumbel-softmax tau)")
        self.save_hyperparameters()
        self.encoder = self.build_encoder()
        self.decoder = self.build_decoder()
        self.vocab_size, self.channels = vocab_size, channels
        self.downsample = 2 ** (group_count - 1)
        # Plain attributes: the annealing callbacks set them every step as a function of global_step.
        self.kl_weight, self.temperature = kl_weight, temperature
        self.val_mse = torchmetrics.MeanSquaredError()
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_codebook = CodebookUsage(vocab_size)
        self._logged_images: tuple[Tensor, Tensor] | None = None

    def build_encoder(self) -> nn.Module:
        """Hook: the encoder, images ``[B, C, H, W]`` -> logits ``[B, vocab_size, H/f, W/f]``.

        Override it to try another architecture under the same training, metrics and token API (the
        sizes are in ``self.hparams``). Example::

            class WideInput(DVAE):
                def build_encoder(self):
                    h = self.hparams
                    return Encoder(h.vocab_size, 2 * h.n_hid, h.group_count, h.n_blk_per_group, h.channels)
        """
        h = self.hparams
        return Encoder(h.vocab_size, h.n_hid, h.group_count, h.n_blk_per_group, h.channels, h.n_layers)

    def build_decoder(self) -> nn.Module:
        """Hook: the decoder, (soft) one-hot codes ``[B, vocab_size, h, w]`` -> ``[B, 2C, H, W]`` (mu, ln b).

        It must also offer ``forward_tokens(tokens [B, h, w])`` (used by `decode`).
        """
        h = self.hparams
        return Decoder(h.vocab_size, h.n_hid, h.group_count, h.n_blk_per_group, h.n_init, h.channels, h.n_layers)

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> DVAE:
        """A DVAE of a named size from `lit_dalle.models.dvae.PRESETS` ("paper", "cpu"); kwargs override."""
        if name not in PRESETS:
            raise ValueError(f"unknown DVAE preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name].as_dict(), **kwargs})

    # ------------------------------------------------------------------------------- pixels and checks
    def map_pixels(self, images: Tensor) -> Tensor:
        """phi(x) = (1 - 2 eps) x + eps: images in [0, 1] -> (eps, 1 - eps) (PAPER.md A.4, Eq. 3)."""
        eps = self.hparams.logit_laplace_eps
        return (1 - 2 * eps) * images + eps

    def unmap_pixels(self, x: Tensor) -> Tensor:
        """The inverse of `map_pixels`, clamped to [0, 1]."""
        eps = self.hparams.logit_laplace_eps
        return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)

    def check_images(self, images: Tensor, check_range: bool = True) -> None:
        """Raise a ValueError naming the problem if images is not a float [B, C, H, W] batch in [0, 1].

        The range check reads the values back (a device sync on GPUs): training does it on the first
        batch of each epoch only.
        """
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != self.channels:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"DVAE expects images [B, {self.channels}, H, W]; got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"DVAE expects float images in [0, 1]; got {images.dtype} (divide uint8 by 255)")
        h, w = images.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the downsampling factor {self.downsample} "
                f"(2**(group_count - 1), group_count={self.hparams.group_count}); resize or crop the images"
            )
        if not check_range:
            return
        lo, hi = images.aminmax()
        if lo < 0 or hi > 1:
            raise ValueError(f"DVAE expects images in [0, 1]; got values in [{lo:.3g}, {hi:.3g}]")

    def check_tokens(self, tokens: Tensor) -> None:
        """Raise a ValueError if tokens is not an integer [B, h, w] tensor of ids in [0, vocab_size)."""
        if not isinstance(tokens, Tensor) or tokens.ndim != 3 or tokens.is_floating_point():
            shape = (tuple(tokens.shape), tokens.dtype) if isinstance(tokens, Tensor) else type(tokens)
            raise ValueError(f"DVAE.decode expects integer tokens [B, h, w]; got {shape}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}) (vocab_size); got [{lo}, {hi}]")

    # ----------------------------------------------------------------------------------------- model
    def setup(self, stage: str) -> None:
        """Convert to channels-last when asked (before the optimizer is built)."""
        if self.hparams.get("channels_last"):
            self.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> Tensor:
        """Codebook logits [B, vocab_size, H/f, W/f] (fp32) of images [B, C, H, W] in [0, 1]."""
        if self.hparams.get("channels_last"):
            images = images.contiguous(memory_format=torch.channels_last)
        return self.encoder(self.map_pixels(images))

    def nll(self, params: Tensor, images: Tensor) -> Tensor:
        """Logit-Laplace NLL per value [B, C, H, W] of images in [0, 1] (PAPER.md A.4, Eq. 2).

        -ln f(x | mu, b) = ln(2 b) + ln(x (1 - x)) + |logit(x) - mu| / b, at x = phi(images), with
        mu = params[:, :C] and ln b = params[:, C:].
        """
        x = self.map_pixels(images.float())
        mu, log_b = params.float().chunk(2, dim=1)
        if self.hparams.get("min_log_scale") is not None:
            log_b = log_b.clamp_min(self.hparams.min_log_scale)
        logit_x = torch.log(x) - torch.log1p(-x)
        return math.log(2) + log_b + torch.log(x * (1 - x)) + (logit_x - mu).abs() * torch.exp(-log_b)

    @staticmethod
    def kl_to_uniform(logits: Tensor) -> Tensor:
        """KL(softmax(logits) || uniform) per position [B, h, w]: sum_k q_k ln(q_k K) (PAPER.md A.3)."""
        log_q = F.log_softmax(logits.float(), dim=1)
        return (log_q.exp() * (log_q + math.log(logits.shape[1]))).sum(dim=1)

    def compute_loss(self, images: Tensor) -> dict[str, Tensor]:
        """Relaxed-ELB loss and its parts for a batch; override to change the objective.

        Returns:
            `loss` (normalised as in the class docstring), `nll` (per value), `kl` (per position),
            `elb_bpd` (relaxed ELB, bits per dim) and the encoder `logits`.
        """
        self.check_images(images, check_range=False)
        logits = self(images)  # [B, K, h, w]
        z = F.gumbel_softmax(logits, tau=self.temperature, hard=False, dim=1)  # soft one-hot [B, K, h, w]
        nll = self.nll(self.decoder(z), images).mean()
        kl = self.kl_to_uniform(logits).mean()
        per_position = images[0].numel() / logits[0, 0].numel()  # D / (h w) = C f**2
        return {
            "loss": nll + self.kl_weight * kl / per_position,
            "nll": nll,
            "kl": kl,
            "elb_bpd": self._bits_per_dim(nll, kl / per_position),
            "logits": logits,
        }

    def _bits_per_dim(self, nll: Tensor, kl_per_dim: Tensor) -> Tensor:
        jacobian = math.log(255 / (1 - 2 * self.hparams.logit_laplace_eps))  # phi maps [0, 255] to (eps, 1-eps)
        return (nll + kl_per_dim + jacobian) / math.log(2)

    # ------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """One relaxed-ELB step on batch["image"]."""
        self.check_images(batch["image"], check_range=batch_idx == 0)
        out = self.compute_loss(batch["image"])
        batch_size = len(batch["image"])
        metrics = {f"train/{k}": out[k] for k in ("loss", "nll", "kl", "elb_bpd")}
        self.log_dict(metrics, on_step=True, batch_size=batch_size)
        values = {"train/beta": float(self.kl_weight), "train/tau": float(self.temperature)}
        if self._trainer is not None and self.trainer.optimizers:
            values["train/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log_dict(values, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("loss", out["loss"], prog_bar=True, logger=False, batch_size=batch_size)
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Relaxed loss, the true ELB (a hard sample of q), and argmax-reconstruction metrics."""
        images = batch["image"]
        self.check_images(images, check_range=batch_idx == 0)
        out = self.compute_loss(images)
        logits = out["logits"]
        tokens = logits.argmax(dim=1)  # [B, h, w]
        # True (unrelaxed) ELB: one exact sample z ~ q per position, beta = 1 (PAPER.md A.3).
        sample = torch.distributions.Categorical(logits=logits.float().movedim(1, -1)).sample()
        hard_nll = self.nll(self.decoder.forward_tokens(sample), images).mean()
        recon = self._images_from_params(self.decoder.forward_tokens(tokens))
        self.val_mse(recon, images.contiguous())
        self.val_psnr(recon, images.contiguous())
        self.val_codebook(tokens)
        per_position = images[0].numel() / tokens[0].numel()
        metrics = {f"val/{k}": out[k] for k in ("loss", "nll", "kl")}
        metrics["val/elb_bpd_relaxed"] = out["elb_bpd"]
        metrics["val/elb_bpd"] = self._bits_per_dim(hard_nll, out["kl"] / per_position)
        self.log_dict(metrics, on_epoch=True, sync_dist=True, batch_size=len(images))
        self.log_dict({"val/mse": self.val_mse, "val/psnr": self.val_psnr}, on_epoch=True, batch_size=len(images))
        if batch_idx == 0 and self.hparams.num_logged_images > 0:
            n = self.hparams.num_logged_images
            self._logged_images = (images[:n].detach().cpu(), recon[:n].detach().float().cpu())

    def on_validation_epoch_end(self) -> None:
        """Log codebook usage over the validation set and the image grid."""
        usage = self.val_codebook.compute()
        self.log_dict({"val/codebook_perplexity": usage["perplexity"], "val/codebook_used": usage["used"]})
        self.val_codebook.reset()
        if self._logged_images is not None and not self.trainer.sanity_checking:
            self._log_image_grid(*self._logged_images)
        self._logged_images = None

    def _log_image_grid(self, originals: Tensor, reconstructions: Tensor) -> None:
        """Originals (top row) vs argmax reconstructions (bottom row) to every TensorBoard-like logger."""
        if not self.trainer.is_global_zero:
            return
        import torchvision  # imported here: only needed when a grid is logged

        grid = torchvision.utils.make_grid(torch.cat([originals, reconstructions]), nrow=len(originals))
        for logger in self.loggers:
            add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
            if callable(add_image):  # TensorBoard's SummaryWriter; other loggers are skipped
                add_image("val/reconstructions", grid, self.global_step)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW(0.9, 0.999, 1e-8, weight decay 1e-4) by default (PAPER.md A.5)."""
        hp = self.hparams
        return torch.optim.AdamW(
            self.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=hp.weight_decay
        )

    # -------------------------------------------------------------------------------------------- API
    def _images_from_params(self, params: Tensor) -> Tensor:
        mu = params[:, : self.channels].float()
        return self.unmap_pixels(torch.sigmoid(mu)).contiguous()  # PAPER.md A.4: ignore ln b, invert phi

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Tokens LongTensor [B, H/f, W/f]: argmax of the logits of images [B, C, H, W] in [0, 1]."""
        self.check_images(images)
        return self(images).argmax(dim=1)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Images [B, C, h*f, w*f] in [0, 1] from tokens [B, h, w] (sigmoid of mu, then phi inverse)."""
        self.check_tokens(tokens)
        return self._images_from_params(self.decoder.forward_tokens(tokens))

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """decode(encode(images)): the argmax reconstruction, in [0, 1]."""
        return self.decode(self.encode(images))

    # --------------------------------------------------------------------------- the released weights
    @classmethod
    def from_openai(cls, encoder_path: str, decoder_path: str, **kwargs: Any) -> DVAE:
        """A DVAE holding the released OpenAI weights (`encoder.pkl`, `decoder.pkl`), sizes inferred.

        The pickles are read tensor by tensor without their classes (`read_openai_checkpoint`).

        Args:
            encoder_path: the released `encoder.pkl` (or a file of the same layout).
            decoder_path: the released `decoder.pkl`.
            **kwargs: training arguments of `DVAE` (kl_weight, lr, ...); sizes come from the files.
        """
        enc_state, enc = read_openai_checkpoint(encoder_path)
        dec_state, dec = read_openai_checkpoint(decoder_path)
        if enc.pop("kind") != "encoder" or dec.pop("kind") != "decoder":
            raise ValueError(f"expected an encoder then a decoder file; got {encoder_path}, {decoder_path}")
        for key in ("vocab_size", "n_hid", "group_count", "n_blk_per_group", "channels", "n_layers"):
            if enc[key] != dec[key]:
                raise ValueError(
                    f"{key} differs between encoder ({enc[key]}) and decoder ({dec[key]}); DVAE needs one value"
                )
        model = cls(**{**enc, **dec, **kwargs})
        model.encoder.load_state_dict(enc_state)
        model.decoder.load_state_dict(dec_state)
        return model


def convert_openai(encoder_path: str, decoder_path: str, out: str) -> None:
    """Convert the released OpenAI dVAE weights to a lit_dalle checkpoint (`DVAE.load_from_checkpoint`).

    Reads the tensors of the pickled modules without their classes, infers the sizes, and writes a
    Lightning checkpoint with the DVAE's state dict and hyperparameters.

    Args:
        encoder_path: the released `encoder.pkl` (https://cdn.openai.com/dall-e/encoder.pkl).
        decoder_path: the released `decoder.pkl` (https://cdn.openai.com/dall-e/decoder.pkl).
        out: where to write the checkpoint (e.g. `dvae_openai.ckpt`).
    """
    from lit_dalle import __version__

    model = DVAE.from_openai(encoder_path, decoder_path)
    checkpoint = {
        "state_dict": model.state_dict(),
        DVAE.CHECKPOINT_HYPER_PARAMS_KEY: dict(model.hparams),
        "pytorch-lightning_version": L.__version__,
        "lit_dalle": {"version": __version__, "format": CHECKPOINT_FORMAT},
        "converted_from": {"encoder": str(encoder_path), "decoder": str(decoder_path)},
    }
    torch.save(checkpoint, out)
