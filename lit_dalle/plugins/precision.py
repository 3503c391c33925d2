"""fp16 mixed precision with one gradient scale per resblock (Ramesh et al. 2021, Sec. 2.4, App. D; PAPER.md C).

Deep and wide transformers trained in fp16 lose the gradients of their later resblocks to underflow: one
global loss scale cannot fit the earliest and the latest blocks' gradients into fp16's 5-bit exponent at
once (C.1). `PerResblockScaling` is Lightning's `MixedPrecision` (fp16 autocast) without its GradScaler:

- the residual stream keeps its activations and gradients in fp32 (C.2; autocast adds each fp16 branch output
  to the fp32 stream, and the gradient is cast to fp16 only inside a branch, after scaling);
- resblock r (any module with a ``res_path`` submodule, `find_resblocks`) has its own scale s_r: the gradient
  entering its branch is multiplied by s_r, the one leaving it has Inf/NaN zeroed and is divided by s_r (C.2);
- its parameter gradients are divided by s_r after backward, before ``on_before_optimizer_step`` and gradient
  clipping, so callbacks and clipping by global norm see true gradients;
- one non-finite gradient anywhere skips the whole update (parameters and optimizer moments), and the
  scales follow C.3 (init M * 2**13, * 2**(1/1000) per clean update, / sqrt(2) at most once per 125
  updates, clamped to [M * 2**7, M * 2**24], M the number of data-parallel replicas).

fp32 islands (C.4): parameters stay fp32 (autocast casts copies for matmuls), so gains, biases, embeddings,
unembeddings and the optimizer moments are fp32; the Prior computes its logits in fp32. Parameters outside
every resblock get no loss scale: the loss, the logits, the heads, the final norm, the stream and the
embeddings are fp32, so their gradients cannot underflow 16-bit. (A model whose non-resblock parts run fp16
matmuls should make them resblocks.) C.5: the paper divides the loss by the global batch and multiplies the
scales by M; Lightning's DDP averages the gradients of a per-replica mean loss instead, so the 16-bit
arithmetic uses s_r / M, the same numbers, while the stored and logged scales carry the factor M.

Scales, cooldowns and counters are in the plugin's ``state_dict`` (so in checkpoints). Logged every
optimizer step: ``precision/skipped_steps`` (cumulative) and ``precision/log2_scale_min|max``; every
``log_every_n_steps``, a histogram of log2 s_r on TensorBoard loggers (PAPER.md Fig. 12).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.types import Optimizable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.optim import LBFGS, Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lit_dalle.plugins.resblock_scaling import (
    NonFiniteFlags,
    ResblockScales,
    find_resblocks,
    scale_branch_input,
    scale_branch_output,
)

__all__ = ["PerResblockScaling"]


class PerResblockScaling(MixedPrecision):
    """fp16 autocast with per-resblock gradient scaling (module docstring; PAPER.md C.1-C.5).

    Select it with ``Trainer(plugins=[PerResblockScaling()])`` and no ``precision`` argument (Lightning refuses
    both); in YAML, ``trainer.plugins: [{class_path: lit_dalle.plugins.PerResblockScaling}]``. One optimizer,
    automatic or manual optimization. Under DDP the non-finite flags are summed across replicas, so every
    replica skips the same steps and keeps the same scales.

    Args:
        device: autocast device type ("cuda", "cpu"); None: the trainer's device.
        replicas: M of PAPER.md C.3/C.5; None: the trainer's world size.
        init_scale: initial scale before the factor M (C.3: 2**13).
        growth_factor: growth per update without a non-finite gradient (C.3: 2**(1/1000)).
        backoff_factor: division on a non-finite gradient (C.3: sqrt(2)).
        cooldown: updates before the same scale may be divided again (C.3: 125).
        min_scale: lower clamp before the factor M (C.3: 2**7).
        max_scale: upper clamp before the factor M (C.3: 2**24).
    """

    def __init__(
        self,
        device: str | None = None,
        replicas: int | None = None,
        init_scale: float = 2.0**13,
        growth_factor: float = 2.0 ** (1 / 1000),
        backoff_factor: float = math.sqrt(2.0),
        cooldown: int = 125,
        min_scale: float = 2.0**7,
        max_scale: float = 2.0**24,
    ) -> None:
        # Not MixedPrecision.__init__: it would build a GradScaler, which the per-resblock scales replace.
        self.precision = "16-mixed"
        self.device = device
        self.scaler = None
        self.replicas = replicas
        self._rule = dict(init=init_scale, growth=growth_factor, backoff=backoff_factor, cooldown=cooldown,
                          min_scale=min_scale, max_scale=max_scale)  # fmt: skip
        ResblockScales([], **self._rule)  # check the rule now, not at fit time
        self.scales: ResblockScales | None = None  # made when the module is converted
        self._pending: dict[str, Any] | None = None  # a state loaded before that
        self._flags = NonFiniteFlags(0)
        self._block_of: dict[int, int] = {}  # id(parameter) -> resblock index
        self._hooks: list[RemovableHandle] = []

    # -- setup -------------------------------------------------------------------------------------------

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Wrap every resblock's ``res_path`` with the scaling functions (forward hooks; parameters stay fp32)."""
        self._remove_hooks()
        blocks = find_resblocks(module)
        if not blocks:
            raise ValueError(
                f"PerResblockScaling found no resblock in {type(module).__name__}: a resblock is a module with an "
                "nn.Module attribute `res_path` (see lit_dalle.plugins.resblock_scaling.find_resblocks). Use "
                "precision='16-mixed' for models without resblocks"
            )
        self._block_of = {}
        for index, (name, block) in enumerate(blocks):
            for param in block.res_path.parameters():
                if self._block_of.setdefault(id(param), index) != index:
                    raise ValueError(f"resblock {name!r} shares a parameter with another resblock: one scale each")
            path = block.res_path
            self._hooks.append(path.register_forward_pre_hook(partial(self._wrap_input, index), with_kwargs=True))
            self._hooks.append(path.register_forward_hook(partial(self._wrap_output, index)))
        trainer = getattr(module, "_trainer", None)
        if self.device is None and trainer is not None:
            self.device = trainer.strategy.root_device.type
        elif self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        names = [name for name, _ in blocks]
        if self.scales is None or self.scales.names != names:
            replicas = self.replicas or (trainer.world_size if trainer else 1)
            self.scales = ResblockScales(names, replicas, **self._rule)
        if self._pending is not None:
            self.scales.load_state_dict(self._pending)
            self._pending = None
        self._flags = NonFiniteFlags(len(blocks))
        return module

    def _wrap_input(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not torch.is_grad_enabled() or not args or not isinstance(args[0], Tensor):
            return None
        x = scale_branch_input(args[0], self.scales.effective[index], self._flags, index)
        return (x, *args[1:]), kwargs

    def _wrap_output(self, index: int, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if not torch.is_grad_enabled():
            return None
        return scale_branch_output(output, self.scales.effective[index])

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @override
    def teardown(self) -> None:
        """Remove the hooks (the next `convert_module` puts them back; the scales stay)."""
        self._remove_hooks()

    # -- the step ----------------------------------------------------------------------------------------

    @override
    def optimizer_step(  # type: ignore[override]
        self, optimizer: Optimizable, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        """Backward (the closure), unscale and check, clip (`_after_closure`), step unless non-finite, update scales."""
        if isinstance(optimizer, LBFGS):
            raise MisconfigurationException("PerResblockScaling and the LBFGS optimizer are not compatible.")
        closure_result = closure()
        if closure_result is None and model.automatic_optimization:  # training_step returned None: no backward
            self._after_closure(model, optimizer)
            return closure_result
        nonfinite, skip = self.unscale_gradients(optimizer, model)
        self._after_closure(model, optimizer)  # on_before_optimizer_step and clipping see true gradients
        step_output = None if skip else optimizer.step(**kwargs)  # skipped: no parameter nor moment changes
        self.scales.update(nonfinite, skipped=skip)
        self._log(model)
        return step_output

    def unscale_gradients(self, optimizer: Optimizer, model: pl.LightningModule | None = None) -> tuple[Tensor, bool]:
        """Divide each resblock's parameter gradients by its scale and find non-finite gradients.

        Returns:
            ``[R]`` bool, True for the resblocks with a non-finite parameter or outgoing activation gradient,
            and whether the update must be skipped (any non-finite gradient, in a resblock or outside).
        """
        groups: dict[int, list[Tensor]] = {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    groups.setdefault(self._block_of.get(id(param), -1), []).append(param.grad)
        count = len(self.scales.names)
        device = next((grads[0].device for grads in groups.values()), torch.device("cpu"))
        found = [torch.zeros((), device=device) for _ in range(count + 1)]  # last: outside every resblock
        for index, grads in groups.items():
            inv = 1.0 / self.scales.effective[index] if index >= 0 else 1.0
            inv_scale = torch.full((), inv, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found[index], inv_scale)  # GradScaler's kernel
        bad = torch.stack(found) > 0  # [R + 1]
        bad[:count] |= self._flags.take(device)
        if model is not None and model.trainer.world_size > 1:  # every replica must take the same decision
            bad = model.trainer.strategy.reduce(bad.float(), reduce_op="sum") > 0
        bad = bad.cpu()  # the one host sync of the step
        return bad[:count], bool(bad.any())

    @override
    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        """Clip as `Precision` does: the gradients are already unscaled, so fused optimizers may clip too."""
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)

    def _log(self, model: pl.LightningModule) -> None:
        log2 = self.scales.scales.log2()  # [R]
        values = {"skipped_steps": float(self.scales.skipped), "log2_scale_min": float(log2.min()),
                  "log2_scale_max": float(log2.max())}  # fmt: skip
        model.log_dict({f"precision/{k}": v for k, v in values.items()}, on_step=True, on_epoch=False)
        trainer = model.trainer
        if trainer.is_global_zero and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_histogram("precision/log2_resblock_scale", log2, trainer.global_step)

    # -- checkpoints -------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        """Scales, cooldowns and counters (empty before the module is converted)."""
        return self.scales.state_dict() if self.scales is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore `state_dict` now, or when the module is converted if that has not happened yet."""
        if self.scales is None:
            self._pending = state_dict
        else:
            self.scales.load_state_dict(state_dict)
