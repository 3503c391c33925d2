"""PerResblockScaling (PAPER.md C): gradients against fp32, skipped steps, the scale rule, checkpoints, a Prior fit.

fp16 autocast runs on the CPU here (slowly): every test forces float16 through the plugin, never through
``precision="16-mixed"`` (Lightning turns that into bf16 on the CPU).
"""

import copy
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lit_dalle.plugins import PerResblockScaling, ResblockScales, find_resblocks

WIDTH = 16


class InfGrad(torch.autograd.Function):
    """Identity whose backward returns Inf: a block that overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class Branch(nn.Module):
    def __init__(self, width=WIDTH, hidden=2 * WIDTH):
        super().__init__()
        self.fc, self.act, self.proj = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)
        self.poison = False

    def forward(self, x):
        h = self.act(self.fc(x))
        return self.proj(InfGrad.apply(h) if self.poison else h)


class Block(nn.Module):
    """The resblock protocol: ``x + post_gain * res_path(x)``."""

    def __init__(self, post_gain):
        super().__init__()
        self.res_path, self.post_gain = Branch(), post_gain

    def forward(self, x):
        return x + self.post_gain * self.res_path(x)


class Deep(nn.Module):
    """48 resblocks whose branch gains fall by ``decay`` per block, so their gradients fall ~2**-0.8 per block."""

    def __init__(self, blocks=48, decay=0.55, gain0=16.0):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(gain0 * decay**r) for r in range(blocks)])
        self.head = nn.Linear(WIDTH, 1)  # outside every resblock: fp32, unscaled

    def forward(self, x):
        return 2 * self.head(self.blocks(x)).sum()


def block_grads(net):
    return [torch.cat([p.grad.flatten() for p in b.res_path.parameters()]) for b in net.blocks]


def zero_fraction_and_error(grads, ref):
    zero = [((g == 0) & (r != 0)).float().mean().item() for g, r in zip(grads, ref)]
    error = [((g - r).norm() / r.norm()).item() for g, r in zip(grads, ref)]
    return zero, error


def test_per_resblock_scaling_keeps_the_gradients_one_global_scale_loses():
    torch.manual_seed(0)
    net, x = Deep(), torch.randn(8, WIDTH)
    net(x).backward()
    ref = block_grads(net)  # fp32 reference
    assert math.log2(ref[0].abs().max()) - math.log2(ref[-1].abs().median()) > 35  # more than fp16 can span

    # One global scale, as GradScaler would at best: the largest power of two with finite gradients.
    for k in range(24, -1, -1):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = net(x)
        (loss * 2.0**k).backward()
        if all(p.grad.isfinite().all() for p in net.parameters()):
            break
    zero, error = zero_fraction_and_error([g / 2.0**k for g in block_grads(net)], ref)
    late_zero = sum(zero[24:]) / 24
    assert late_zero > 0.3 and max(error[40:]) > 0.5, (k, late_zero, error[40:])

    # Per resblock: C.3's rule on a fast clock (start at the upper clamp, halve flagged scales, no
    # cooldown or growth) settles each scale below its block's overflow; measure the last clean step.
    plugin = PerResblockScaling("cpu", init_scale=2.0**24, growth_factor=1.0, backoff_factor=2.0, cooldown=0)
    plugin.convert_module(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    for _ in range(20):
        net.zero_grad()
        with plugin.forward_context():
            net(x).backward()
        nonfinite, skip = plugin.unscale_gradients(optimizer)
        plugin.scales.update(nonfinite, skip)
        if not skip:
            break
    assert not skip and plugin.scales.skipped > 0  # block 0 overflowed at 2**24 and came down
    log2 = plugin.scales.scales.log2()
    assert log2[0] < 10 and log2[-1] == 24  # early blocks low, late blocks at the clamp
    zero, error = zero_fraction_and_error(block_grads(net), ref)
    assert sum(zero) / len(zero) < 0.01 and max(error) < 5e-3, (zero, error)
    assert net.head.weight.grad.dtype == torch.float32


class DeepModule(L.LightningModule):
    def __init__(self, blocks=12, lr=1e-2, sgd=False, fused=False):
        super().__init__()
        self.net, self.lr, self.sgd, self.fused = Deep(blocks=blocks, decay=0.8, gain0=1.0), lr, sgd, fused
        self.data = TensorDataset(torch.randn(32, WIDTH))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]) / batch[0].numel()

    def configure_optimizers(self):
        if self.sgd:
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.AdamW(self.parameters(), lr=self.lr, fused=self.fused)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=8)


def run(model, tmp_path, steps, plugin=None, callbacks=(), **kwargs):
    trainer = L.Trainer(
        max_steps=steps, plugins=[plugin or PerResblockScaling()], default_root_dir=tmp_path, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, callbacks=list(callbacks),
        **kwargs,
    )  # fmt: skip
    trainer.fit(model)
    return trainer


class Poison(L.Callback):
    """Make block ``block`` overflow at step ``step``; snapshot what must not change."""

    def __init__(self, block, step):
        self.block, self.step, self.seen = block, step, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        at = trainer.global_step == self.step
        pl_module.net.blocks[self.block].res_path.poison = at
        if at:
            self.seen["params"] = copy.deepcopy(pl_module.state_dict())
            self.seen["optimizer"] = copy.deepcopy(trainer.optimizers[0].state_dict())
            self.seen["scales"] = trainer.precision_plugin.scales.scales.clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            self.seen["finite"] = [all(p.grad.isfinite().all() for p in b.parameters()) for b in pl_module.net.blocks]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if "after_params" not in self.seen and "params" in self.seen:
            self.seen["after_params"] = copy.deepcopy(pl_module.state_dict())
            self.seen["after_optimizer"] = copy.deepcopy(trainer.optimizers[0].state_dict())
            self.seen["after_scales"] = trainer.precision_plugin.scales.scales.clone()


def test_an_inf_in_one_block_skips_the_step_and_drops_only_that_scale(tmp_path):
    torch.manual_seed(0)
    poison = Poison(block=5, step=2)
    trainer = run(DeepModule(), tmp_path, steps=3, callbacks=[poison])
    seen, plugin = poison.seen, trainer.precision_plugin
    assert seen["finite"] == [r != 5 for r in range(12)]  # filtered: blocks 0-4 (before it in the stream) clean
    for name, value in seen["params"].items():
        assert torch.equal(value, seen["after_params"][name]), name
    for index, state in seen["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, seen["after_optimizer"]["state"][index][key]), (index, key)
    ratio = seen["after_scales"] / seen["scales"]
    assert ratio[5].item() == pytest.approx(2**-0.5)
    others = torch.cat([ratio[:5], ratio[6:]])
    assert torch.allclose(others, torch.full_like(others, 2 ** (1 / 1000)))  # clean scales still grow (G.8)
    assert plugin.scales.skipped == 1 and plugin.scales.updates == 3
    assert trainer.callback_metrics["precision/skipped_steps"] == 1


def test_gradients_are_true_before_callbacks_and_clipping(tmp_path):
    torch.manual_seed(0)
    model = DeepModule(lr=1.0, sgd=True)
    reference, batch = copy.deepcopy(model), next(iter(model.train_dataloader()))
    reference.training_step(batch, 0).backward()  # fp32 gradients of the first step
    true_norm = torch.cat([p.grad.flatten() for p in reference.parameters()]).norm()
    seen = {}

    class Grab(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen["grads"] = [p.grad.clone() for p in pl_module.parameters()]

    before = [p.detach().clone() for p in model.parameters()]
    clip = true_norm.item() / 4
    run(model, tmp_path, steps=1, callbacks=[Grab()], gradient_clip_val=clip)
    for grad, ref in zip(seen["grads"], reference.parameters()):
        assert torch.allclose(grad, ref.grad, rtol=1e-2, atol=1e-3 * ref.grad.abs().max().item())
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert step.norm().item() == pytest.approx(clip, rel=1e-3)  # SGD lr 1: the step is the clipped true gradient


def test_fused_optimizers_may_clip(tmp_path):  # MixedPrecision refuses this: its GradScaler unscales in step()
    trainer = run(DeepModule(fused=True), tmp_path, steps=2, gradient_clip_val=0.1)
    assert trainer.precision_plugin.scales.updates == 2


class ManualModule(DeepModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.net.blocks[2].res_path.poison = batch_idx == 1
        self.manual_backward(super().training_step(batch, batch_idx))
        optimizer.step()


def test_manual_optimization_is_scaled_and_skipped(tmp_path):
    plugin = run(ManualModule(), tmp_path, steps=3).precision_plugin
    assert (plugin.scales.updates, plugin.scales.skipped) == (3, 1)
    assert plugin.scales.scales[2] < plugin.scales.scales[0]


def test_scale_rule_growth_cooldown_and_clamps():
    rule = ResblockScales(["a", "b"], replicas=4)
    assert rule.scales.tolist() == [4 * 2.0**13] * 2 and rule.effective == [2.0**13] * 2  # C.5: s / M in 16 bit
    clean, a_bad = torch.tensor([False, False]), torch.tensor([True, False])
    for _ in range(1000):
        rule.update(clean, skipped=False)
    assert rule.scales.tolist() == pytest.approx([4 * 2.0**14] * 2)  # doubles every 1000 clean updates
    rule.update(a_bad, skipped=True)
    a = rule.scales[0].item()
    assert a == pytest.approx(4 * 2.0**14 / math.sqrt(2))
    for _ in range(124):  # cooldown: neither divided again nor grown while flagged
        rule.update(a_bad, skipped=True)
    assert rule.scales[0].item() == a
    rule.update(a_bad, skipped=True)  # the 125th update after the division
    assert rule.scales[0].item() == pytest.approx(a / math.sqrt(2))
    assert rule.skipped == 126 and rule.updates == 1126
    for _ in range(12_000):  # b grew all along: clamped at M * 2**24
        rule.update(clean, skipped=False)
    assert rule.scales.tolist() == [4 * 2.0**24] * 2
    fast = ResblockScales(["a"], cooldown=0)
    for _ in range(40):
        fast.update(torch.tensor([True]), skipped=True)
    assert fast.scales.tolist() == [2.0**7]  # clamped at M * 2**7
    with pytest.raises(ValueError, match="backoff"):
        PerResblockScaling(backoff_factor=1.0)


def test_scales_survive_a_checkpoint_and_resume(tmp_path):
    torch.manual_seed(0)
    poison = Poison(block=3, step=1)
    trainer = run(DeepModule(), tmp_path, steps=3, callbacks=[poison])
    saved = trainer.precision_plugin.state_dict()
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=False)
    assert checkpoint["PerResblockScaling"]["names"] == [f"net.blocks.{r}" for r in range(12)]
    seen = {}

    class Grab(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update(trainer.precision_plugin.state_dict())

    resumed = L.Trainer(
        max_steps=4, plugins=[PerResblockScaling()], default_root_dir=tmp_path, logger=False, callbacks=[Grab()],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    resumed.fit(DeepModule(), ckpt_path=tmp_path / "a.ckpt")
    assert torch.equal(seen["scales"], saved["scales"]) and torch.equal(seen["last_drop"], saved["last_drop"])
    assert (seen["updates"], seen["skipped"]) == (3, 1) and resumed.precision_plugin.scales.updates == 4
    other = PerResblockScaling("cpu")
    other.convert_module(Deep(blocks=4))
    with pytest.raises(ValueError, match="12 resblocks"):
        other.load_state_dict(saved)


def test_resblocks_are_found_by_protocol_outermost_first():
    net = nn.Sequential(Block(1.0), nn.Linear(WIDTH, WIDTH), Block(1.0))
    net[0].res_path.inner = Block(1.0)  # nested: shares the outer block's scale
    assert [name for name, _ in find_resblocks(net)] == ["0", "2"]
    with pytest.raises(ValueError, match="no resblock"):
        PerResblockScaling("cpu").convert_module(nn.Linear(2, 2))


class TokenBatches(Dataset):
    captions = ["a red circle", "a blue square", "a small green triangle", "a large red square"]

    def __init__(self, grid, vocab, n=32):
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, vocab, (n, grid, grid), generator=generator)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"image_tokens": self.tokens[i], "caption": self.captions[i % 4]}


def test_a_tiny_prior_fits_in_fp16_with_the_plugin(tmp_path):
    from lit_dalle.dvae import DVAE
    from lit_dalle.prior import Prior
    from lit_dalle.text import TextTokenizer

    TextTokenizer.train(TokenBatches.captions * 20, 300).save(tmp_path / "tokenizer.json")
    dvae = DVAE(vocab_size=64, n_hid=8, group_count=4, n_blk_per_group=1, n_init=8)  # loaded, never run
    torch.save({"state_dict": dvae.state_dict(), "hyper_parameters": dict(dvae.hparams),
                "pytorch-lightning_version": L.__version__}, tmp_path / "dvae.ckpt")  # fmt: skip
    torch.manual_seed(0)
    size = dict(text_vocab=300, text_len=12, image_size=32, image_vocab=64, downsample=8, depth=2, width=32, heads=2)
    prior = Prior(dvae=str(tmp_path / "dvae.ckpt"), tokenizer=str(tmp_path / "tokenizer.json"), lr=3e-3, **size)
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_steps=12, plugins=[PerResblockScaling()], gradient_clip_val=4.0, logger=TensorBoardLogger(tmp_path),
        log_every_n_steps=4, callbacks=[Losses()], enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(prior, DataLoader(TokenBatches(grid=4, vocab=64), batch_size=8))
    plugin = trainer.precision_plugin
    assert plugin.device == "cpu" and plugin.precision == "16-mixed"
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert plugin.scales.names == [f"transformer.blocks.{i}.{b}" for i in range(2) for b in ("attn", "mlp")]
    assert trainer.callback_metrics["precision/log2_scale_max"] == pytest.approx(13 + 12 / 1000, abs=1e-3)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.logger.log_dir).Reload()
    assert "precision/log2_resblock_scale" in events.Tags()["histograms"]
    assert "precision/skipped_steps" in events.Tags()["scalars"]


def test_yaml_selects_the_plugin(tmp_path):
    from lightning.pytorch import LightningDataModule, LightningModule

    from lit_dalle.cli import DalleCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  plugins:\n    - class_path: lit_dalle.plugins.PerResblockScaling\n"
        "      init_args: {device: cpu, cooldown: 50}\nmodel:\n  class_path: tiny_model.TinyModel\n"
    )
    cli = DalleCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   run=False, args=[f"--config={config}"], save_config_callback=None)  # fmt: skip
    plugin = cli.trainer.precision_plugin
    assert isinstance(plugin, PerResblockScaling) and plugin.device == "cpu" and plugin._rule["cooldown"] == 50
    assert cli.trainer.precision == "16-mixed"
