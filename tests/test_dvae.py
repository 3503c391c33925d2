import importlib.util
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger
from torch.utils.data import DataLoader, Dataset

from lit_dalle.callbacks import EMA, KLWeightSchedule, LearningRateSchedule, TemperatureSchedule
from lit_dalle.cli import DalleCLI, main
from lit_dalle.dvae import DVAE

TINY = dict(vocab_size=32, n_hid=8, group_count=3, n_blk_per_group=1, n_init=8)  # f = 4


class Shapes(Dataset):
    """Tiny synthetic batches in the DataModule's dict format: a coloured square on black."""

    def __init__(self, n: int = 8, size: int = 16) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        img = torch.zeros(3, self.size, self.size)
        x, y = torch.randint(0, self.size // 2, (2,), generator=g).tolist()
        img[:, y : y + self.size // 2, x : x + self.size // 2] = torch.rand(3, 1, 1, generator=g)
        return {"image": img, "caption": f"square {i}", "key": f"{i:04d}"}


def _loader(n=8, size=16, bs=4):
    return DataLoader(Shapes(n, size), batch_size=bs)


def _trainer(tmp_path, **kw):
    defaults = dict(
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    return L.Trainer(**{**defaults, **kw})


# ------------------------------------------------------------------------------------------- objective
def test_nll_is_the_logit_laplace_density():
    model = DVAE(**TINY, channels=1)
    images = torch.rand(2, 1, 4, 4)
    params = torch.randn(2, 2, 4, 4)
    x = 0.8 * images + 0.1
    mu, log_b = params.chunk(2, 1)
    # Eq. 2: y = logit(x) ~ Laplace(mu, b), density of x = density of y / (x (1 - x))
    expected = -(torch.distributions.Laplace(mu, log_b.exp()).log_prob(torch.logit(x)) - torch.log(x * (1 - x)))
    torch.testing.assert_close(model.nll(params, images), expected, rtol=1e-5, atol=1e-5)


def test_min_log_scale_floors_b_cell_by_cell():
    # Below the floor every value is scored at b = exp(floor) and ln b gets no gradient; above it, nothing changes.
    floor = -1.0
    model = DVAE(**TINY, channels=1, min_log_scale=floor)
    images = torch.rand(2, 1, 4, 4)
    params = torch.randn(2, 2, 4, 4) * 2
    params[:, 1, ::2] = -4.0  # half the cells far below the floor
    params.requires_grad_(True)
    nll = model.nll(params, images)
    x = 0.8 * images + 0.1
    mu, log_b = params.detach().chunk(2, 1)
    b = log_b.clamp_min(floor).exp()
    expected = -(torch.distributions.Laplace(mu, b).log_prob(torch.logit(x)) - torch.log(x * (1 - x)))
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-5)
    # The density is bounded: nll >= ln(2 b_min) + ln(x (1 - x)), which the unfloored model can go below.
    assert (nll >= math.log(2) + floor + torch.log(x * (1 - x)) - 1e-6).all()
    nll.sum().backward()
    below = log_b < floor
    assert below.any() and (params.grad[:, 1:][below] == 0).all()
    unfloored = DVAE(**TINY, channels=1)
    p2 = params.detach().clone().requires_grad_(True)
    unfloored.nll(p2, images).sum().backward()
    torch.testing.assert_close(params.grad[:, 1:][~below], p2.grad[:, 1:][~below])
    # mu's gradient is 1 / b: the floored one where b was floored, the model's own elsewhere.
    torch.testing.assert_close(params.grad[:, :1][~below], p2.grad[:, :1][~below])
    assert (params.grad[:, :1][below].abs() <= math.exp(-floor) + 1e-6).all()


def test_kl_to_uniform():
    k = 16
    assert DVAE.kl_to_uniform(torch.zeros(1, k, 2, 2)).abs().max() < 1e-6
    peaked = torch.full((1, k, 1, 1), -1e4)
    peaked[:, 3] = 0
    assert DVAE.kl_to_uniform(peaked).item() == pytest.approx(math.log(k), rel=1e-5)


@pytest.mark.parametrize("size", [16, 32])
def test_loss_normalisation_is_beta_over_c_f2(size):
    # PAPER.md A.3: loss = mean NLL + beta / (C f**2) mean KL; 3 * 4**2 = 48 for f = 4 at any resolution.
    model = DVAE(**TINY, kl_weight=2.5)
    out = model.compute_loss(torch.rand(2, 3, size, size))
    torch.testing.assert_close(out["loss"] - out["nll"], 2.5 * out["kl"] / 48)
    bpd = (out["nll"] + out["kl"] / 48 + math.log(255 / 0.8)) / math.log(2)
    torch.testing.assert_close(out["elb_bpd"], bpd)


def test_decoder_gets_a_soft_relaxed_sample(monkeypatch):
    model = DVAE(**TINY, temperature=0.7)
    seen = {}
    forward = model.decoder.forward

    def spy(z):
        seen["z"] = z
        return forward(z)

    monkeypatch.setattr(model.decoder, "forward", spy)
    model.compute_loss(torch.rand(2, 3, 16, 16))
    z = seen["z"]
    torch.testing.assert_close(z.sum(1), torch.ones_like(z.sum(1)))
    assert ((z > 0.001) & (z < 0.999)).any()  # not one-hot: no straight-through


# ----------------------------------------------------------------------------------------------- API
def test_encode_decode_reconstruct_shapes_and_range():
    model = DVAE(**TINY)
    images = torch.rand(3, 3, 16, 8)
    tokens = model.encode(images)
    assert tokens.dtype == torch.long and tokens.shape == (3, 4, 2)
    out = model.decode(tokens)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(model.reconstruct(images), out)


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.rand(1, 1, 16, 16), r"\[B, 3, H, W\]"),
        (torch.rand(3, 16, 16), r"\[B, 3, H, W\]"),
        ((torch.rand(1, 3, 16, 16) * 255).to(torch.uint8), "divide uint8 by 255"),
        (torch.rand(1, 3, 18, 16), "not divisible by the downsampling factor 4"),
        (torch.rand(1, 3, 16, 16) * 255, r"in \[0, 1\]"),
    ],
)
def test_encode_rejects_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        DVAE(**TINY).encode(images)


@pytest.mark.parametrize(
    "tokens, match",
    [
        (torch.full((1, 2, 2), 32), r"\[0, 32\)"),
        (torch.full((1, 2, 2), -1), r"\[0, 32\)"),
        (torch.zeros(1, 2, 2), "integer tokens"),
        (torch.zeros(2, 2, dtype=torch.long), "integer tokens"),
    ],
)
def test_decode_rejects_bad_tokens(tokens, match):
    with pytest.raises(ValueError, match=match):
        DVAE(**TINY).decode(tokens)


def test_training_step_checks_the_first_batch():
    model = DVAE(**TINY)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        model.training_step({"image": torch.rand(2, 3, 16, 16) * 255}, 0)
    with pytest.raises(ValueError, match="not divisible"):
        model.training_step({"image": torch.rand(2, 3, 18, 16)}, 5)


def test_configure_optimizers_is_the_papers_adamw():
    opt = DVAE(**TINY).configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-4, (0.9, 0.999), 1e-8, 1e-4)


# ------------------------------------------------------------------------------------------ training
class _ImageLogger(Logger):
    """A logger whose experiment records add_image calls (TensorBoard-like)."""

    def __init__(self):
        super().__init__()
        self.images = []

    name, version = "spy", 0

    @property
    def experiment(self):
        return self

    def add_image(self, tag, grid, step):
        self.images.append((tag, tuple(grid.shape), step))

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_training_learns_and_logs(tmp_path):
    torch.manual_seed(0)
    model = DVAE(**TINY, lr=3e-3, num_logged_images=4)
    spy = _ImageLogger()
    callbacks = [
        KLWeightSchedule(end=1.0, steps=10),
        TemperatureSchedule(end=0.5, steps=20),
        LearningRateSchedule(start=3e-3, end=1e-3, steps=40),
        EMA(decay=0.9),
    ]
    trainer = _trainer(
        tmp_path, max_steps=30, check_val_every_n_epoch=15, logger=[spy, CSVLogger(tmp_path)], callbacks=callbacks
    )
    loader = _loader(n=8, bs=4)
    before = model.compute_loss(next(iter(loader))["image"])["nll"].item()
    trainer.fit(model, loader, loader)
    metrics = trainer.callback_metrics
    for key in ["val/loss", "val/nll", "val/kl", "val/elb_bpd", "val/mse", "val/psnr", "val/codebook_used"]:
        assert torch.isfinite(metrics[key]), key
    assert 0 < metrics["val/codebook_used"] <= 1 and metrics["val/codebook_perplexity"] >= 1
    assert metrics["train/beta"] == 1.0 and metrics["train/tau"] == 0.5
    assert metrics["train/lr"] == pytest.approx(callbacks[2].value(29))  # logged before the 30th update
    assert metrics["val/nll"] < before - 0.1  # it learns
    assert spy.images and spy.images[0][0] == "val/reconstructions" and spy.images[0][1][0] == 3


def test_channels_last_gives_the_same_numbers(tmp_path):
    torch.manual_seed(0)
    model = DVAE(**TINY, channels_last=True)
    images = torch.rand(2, 3, 16, 16)
    before = model(images)
    model.setup("fit")
    assert model.encoder.input.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(images), before, rtol=1e-5, atol=1e-5)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(model, _loader(4), _loader(4))
    assert torch.isfinite(trainer.callback_metrics["val/psnr"])


def test_validation_without_logger(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=1)
    trainer.fit(DVAE(**TINY), _loader(4), _loader(4))
    assert "val/psnr" in trainer.callback_metrics


# --------------------------------------------------------------------------------- released weights
def _reference(n_blk_per_group=2, channels=3, n_layers=None):
    if importlib.util.find_spec("dall_e") is None:
        pytest.skip("the test-only reference dall-e==0.1 is not installed (pip install --no-deps dall-e==0.1)")
    import attr  # dall_e imports attrs and requests without declaring them: fail loudly if either is missing
    import dall_e

    torch.manual_seed(0)
    with attr.validators.disabled():  # its validators want n_hid >= 64, vocab >= 512: keep the test small
        enc = dall_e.Encoder(n_hid=16, vocab_size=64, n_blk_per_group=n_blk_per_group, input_channels=channels)
        dec = dall_e.Decoder(
            n_hid=16, vocab_size=64, n_init=8, n_blk_per_group=n_blk_per_group, output_channels=channels
        )
    for module in [enc, dec]:
        for p in module.parameters():  # non-zero biases, so a dropped bias would show
            if p.dim() == 1:
                torch.nn.init.normal_(p, std=0.1)
        if n_layers is not None:  # a file written with another group_count attribute
            for block in module.modules():
                if hasattr(block, "post_gain"):
                    block.n_layers, block.post_gain = n_layers, 1 / n_layers**2
    return dall_e, enc, dec


@pytest.mark.parametrize("variant", [{}, {"n_blk_per_group": 1, "channels": 1, "n_layers": 6}])
def test_from_openai_matches_the_reference(tmp_path, variant):
    dall_e, ref_enc, ref_dec = _reference(**variant)
    torch.save(ref_enc, tmp_path / "encoder.pkl")  # as the released files were written: whole modules
    torch.save(ref_dec, tmp_path / "decoder.pkl")
    model = DVAE.from_openai(str(tmp_path / "encoder.pkl"), str(tmp_path / "decoder.pkl")).eval()
    assert model.hparams.n_hid == 16 and model.hparams.vocab_size == 64
    assert model.hparams.n_blk_per_group == variant.get("n_blk_per_group", 2)

    images = torch.rand(2, variant.get("channels", 3), 32, 32)
    with torch.no_grad():
        ref_logits = ref_enc(dall_e.map_pixels(images))
        tokens = ref_logits.argmax(1)
        one_hot = torch.nn.functional.one_hot(tokens, 64).permute(0, 3, 1, 2).float()
        ref_out = ref_dec(one_hot)
        ref_recon = dall_e.unmap_pixels(torch.sigmoid(ref_out[:, : images.shape[1]]))
        soft = torch.softmax(ref_logits, 1)
        assert (model(images) - ref_logits).abs().max() <= 1e-5
        assert (model.decoder(soft) - ref_dec(soft)).abs().max() <= 1e-5
    assert torch.equal(model.encode(images), tokens)
    assert (model.decode(tokens) - ref_recon).abs().max() <= 1e-5

    # the CLI subcommand `python -m lit_dalle convert-openai-dvae` runs `convert_openai`
    enc, dec, out = (str(tmp_path / name) for name in ("encoder.pkl", "decoder.pkl", "dvae.ckpt"))
    main(["convert-openai-dvae", f"--encoder-path={enc}", f"--decoder-path={dec}", f"--out={out}"])
    loaded = DVAE.load_from_checkpoint(out)
    assert (loaded.reconstruct(images) - ref_recon).abs().max() <= 1e-5


def test_from_openai_rejects_swapped_files(tmp_path):
    _, ref_enc, ref_dec = _reference()
    torch.save(ref_enc, tmp_path / "encoder.pkl")
    torch.save(ref_dec, tmp_path / "decoder.pkl")
    with pytest.raises(ValueError, match="expected an encoder then a decoder"):
        DVAE.from_openai(str(tmp_path / "decoder.pkl"), str(tmp_path / "encoder.pkl"))


# ------------------------------------------------------------------------------------------- configs
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_EMBEDDED = [
    "--data.num_workers=0",
    "--data.embedded.train_samples=8",
    "--data.embedded.val_samples=4",
    "--data.embedded.heldout_samples=4",
]
OFF_CLUSTER = [  # the paper config on this CPU: one process, fp32, tiny sizes
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.num_nodes=1",
    "--trainer.strategy=auto",
    "--trainer.precision=32-true",
]


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("dvae.yaml", ["--data.resolution=32", "--data.batch_size=4"]),
        (
            "paper/dvae.yaml",
            [
                *OFF_CLUSTER,
                *[f"--model.{k}={v}" for k, v in TINY.items()],
                "--data.resolution=32",
                "--data.batch_size=2",
                "--data.pin_memory=false",
            ],
        ),
    ],
)
def test_config_fast_dev_run(config, overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in the config (runs/dvae/checkpoints) land in tmp_path
    cli = main(
        [
            "fit",
            f"--config={CONFIGS / config}",
            *TINY_EMBEDDED,
            *overrides,
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.trainer.state.finished and isinstance(cli.model, DVAE)
    callbacks = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"KLWeightSchedule", "TemperatureSchedule", "LearningRateSchedule", "EMA"} <= callbacks


def test_paper_config_parameter_counts_on_meta_device():
    with torch.device("meta"):
        cli = DalleCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=[f"--config={CONFIGS / 'paper' / 'dvae.yaml'}", *OFF_CLUSTER],
        )
    model = cli.model
    assert isinstance(model, DVAE) and model.encoder.group_1.block_1.res_path.conv_1.weight.is_meta
    assert sum(p.numel() for p in model.encoder.parameters()) == pytest.approx(53.8e6, rel=2e-3)
    assert sum(p.numel() for p in model.decoder.parameters()) == pytest.approx(43.8e6, rel=2e-3)
    assert cli.datamodule.resolution == 256 and cli.datamodule.batch_size == 8
