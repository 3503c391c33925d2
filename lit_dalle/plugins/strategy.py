"""Parameter sharding inside a node, PowerSGD across nodes (Ramesh et al. 2021, Sec. 2.5, App. E; PAPER.md D).

`ShardedPowerSGD` ("shard_powersgd") is Lightning's `ModelParallelStrategy` (FSDP2 on torch.distributed; gloo
on CPU, NCCL on GPUs) on a 2-D device mesh ``(replicate, shard) = (nodes, devices per node)``:

- the strategy shards the module itself (no ``configure_model`` needed): every resblock (a module with a
  ``res_path``, `find_resblocks`) is one FSDP2 unit, then every direct child of the LightningModule with
  trainable parameters (the root networks, e.g. the Prior's ``transformer``), all on the "shard" dimension.
  FSDP2 all-gathers a unit's parameters before it runs and reduce-scatters its gradients inside the node,
  leaving each rank its shard's gradient averaged over its node (D.1);
- after backward and before clipping and the optimizer step (a wrapper around Lightning's closure), a
  `CrossNodeReducer` averages each shard's gradient with the same-ordinal ranks of the other nodes:
  PowerSGD with error feedback for matrices, one grouped fp32 all-reduce for embeddings, unembeddings, gains
  and biases (`uncompressed_parameter_names`) and 1-D tensors (D.2-D.3, `lit_dalle.plugins.powersgd`);
- any non-finite gradient skips the update on every rank (D.3 step 10): with `PerResblockScaling` the
  plugin sees the non-finite gradients and skips (and backs its scales off); with any other precision the
  gradients are set to None, so the optimizer changes neither parameters nor moments;
- checkpoints are distributed checkpoints (as `ModelParallelStrategy`) holding, besides the sharded model
  and optimizer, each error buffer summed over the same-ordinal ranks (D.3 "Checkpointing error buffers")
  and the per-shard callback states (`lit_dalle.callbacks.EMA`'s average: rank 0 alone writes the rest).
  On resume the sums are resharded to the new layout by torch.distributed.checkpoint and divided by the new
  number of nodes, so a different world size or number of devices per node resumes; a buffer whose
  parameter changed shape, or a checkpoint without buffers, starts from zero with a warning.

Every forward is collective under sharding (FSDP2 all-gathers), so every rank must run the same number of
batches in every loop, validation included (DDP tolerates uneven validation, this does not: the rank with the
extra batch waits until ``timeout_s``). `TextImageDataModule` splits validation and test shards by sample,
which gives every rank equal batches. Training by shard is exact-pass: give it ``samples_per_epoch`` (or
shards of equal size, a multiple of the world size). A ``val_fraction`` split of the training shards is
split by shard: cap it with ``limit_val_batches``.

Simulating nodes on one machine: ``devices_per_node`` splits ``trainer.devices * trainer.num_nodes`` processes
into nodes of that size (``devices=4, devices_per_node=2``: 2 nodes of 2). Left None, a node is the
trainer's ``devices`` (under SLURM: ``--ntasks-per-node``).

`DDPPowerSGD` ("ddp_powersgd") is the simple option: DDP with torch's own ``powerSGD_hook``, registered by
the strategy itself because Lightning drops ``ddp_comm_hook`` off CUDA (STACK.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.strategies.fsdp import _distributed_checkpoint_load, _distributed_checkpoint_save
from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd
from torch.distributed.device_mesh import init_device_mesh
from torch.optim import Optimizer
from typing_extensions import override

from lit_dalle.plugins.powersgd import CrossNodeReducer, QMode, local_tensor
from lit_dalle.plugins.precision import PerResblockScaling
from lit_dalle.plugins.resblock_scaling import find_resblocks

try:  # torch >= 2.6
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch 2.4-2.5
    from torch.distributed._composable.fsdp import fully_shard
try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor
except ImportError:  # torch 2.4
    from torch.distributed._tensor import DTensor

__all__ = ["DDPPowerSGD", "ShardedPowerSGD", "uncompressed_parameter_names"]

UNEMBEDDINGS = ("*_head.weight",)
"""Name patterns of the unembeddings (output heads), uncompressed like the embeddings (PAPER.md D.2)."""
_ERROR_KEY = "powersgd_error_sums"
_CALLBACK_KEY = "callback_shards"
_SHARDED = "<in the distributed checkpoint>"


def uncompressed_parameter_names(module: nn.Module, patterns: Sequence[str] = UNEMBEDDINGS) -> set[str]:
    """Parameters that skip compression (PAPER.md D.2): embeddings, unembeddings, gains and biases.

    The union of every submodule's ``no_decay_parameter_names()`` (e.g. `Transformer`'s: gains, biases,
    embeddings), the parameters of embedding and normalisation layers and every ``bias`` (for modules without
    that method), and the names matching one of the ``fnmatch`` ``patterns`` (the unembeddings: by default
    the `Transformer`'s ``text_head`` / ``image_head``).
    """
    names = {name for name, _ in module.named_parameters() if any(fnmatch(name, pat) for pat in patterns)}
    for prefix, sub in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        if callable(getattr(sub, "no_decay_parameter_names", None)):
            names |= {dot + name for name in sub.no_decay_parameter_names()}
        norm = isinstance(sub, (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase))
        for name, _ in sub.named_parameters(recurse=False):
            if norm or name == "bias":
                names.add(dot + name)
    return names


class ShardedPowerSGD(ModelParallelStrategy):
    """FSDP2 sharding inside a node, PowerSGD across nodes (module docstring; PAPER.md D.1-D.3).

    In YAML: ``trainer.strategy: {class_path: lit_dalle.plugins.ShardedPowerSGD, init_args: {rank: 896}}``,
    or ``trainer.strategy: shard_powersgd`` for the defaults. Nodes are ``trainer.num_nodes`` unless
    ``devices_per_node`` says otherwise.

    Args:
        rank: total PowerSGD rank of a node (PAPER.md D.2: 896); each device uses ``rank // devices_per_node``
            for its shard. None or 0: no compression (an fp32 all-reduce of every shard gradient across nodes).
        q_mode: "fixed": Q is a random Gaussian drawn once (the paper's choice, D.2 fn. 10); "warm_start":
            each step starts from the previous Q (Vogels et al. 2019).
        start_iter: optimizer steps with uncompressed all-reduces before compression starts (the paper: 0).
        devices_per_node: processes per node; None: the trainer's ``devices``.
        epsilon: added to P's diagonal before the Householder QR (D.3 step 5: 1e-6).
        compress_small: also compress matrices whose factors are not smaller than the shard (tests).
        seed: seed of the fixed Q matrices.
        uncompressed: ``fnmatch`` patterns of further uncompressed parameters, besides embeddings, gains and
            biases (`uncompressed_parameter_names`); default: the unembeddings ``*_head.weight``.
        save_distributed_checkpoint: one file per rank (True) or a full checkpoint assembled on rank 0.
        process_group_backend: "gloo", "nccl", ... (None: the device's default).
        timeout_s: collective timeout in seconds: a rank that dies makes the others fail after this long.
    """

    strategy_name = "shard_powersgd"

    def __init__(
        self,
        rank: int | None = 896,
        q_mode: QMode = "fixed",
        start_iter: int = 0,
        devices_per_node: int | None = None,
        epsilon: float = 1e-6,
        compress_small: bool = False,
        seed: int = 0,
        uncompressed: Sequence[str] = UNEMBEDDINGS,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout_s: float = 1800.0,
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timedelta(seconds=timeout_s),
        )
        if (rank is not None and rank < 0) or start_iter < 0 or (devices_per_node is not None and devices_per_node < 1):
            raise ValueError(f"ShardedPowerSGD: need rank >= 0, start_iter >= 0, devices_per_node >= 1; got "
                             f"rank={rank}, start_iter={start_iter}, devices_per_node={devices_per_node}")  # fmt: skip
        if q_mode not in ("fixed", "warm_start"):
            raise ValueError(f"ShardedPowerSGD: q_mode={q_mode!r}; use 'fixed' (the paper's choice) or 'warm_start'")
        self.rank, self.q_mode, self.start_iter = rank, q_mode, start_iter
        self._devices_per_node, self.epsilon, self.compress_small, self.seed = (
            devices_per_node,
            epsilon,
            compress_small,
            seed,
        )
        self.uncompressed = tuple(uncompressed)
        self.reducer: CrossNodeReducer | None = None
        self.skipped_steps = 0  # updates skipped for a non-finite gradient

    # -- layout ----------------------------------------------------------------------------------------

    @property
    def layout(self) -> tuple[int, int]:
        """``(nodes, devices per node)`` of this run."""
        per_node = self._devices_per_node or self.num_processes
        if self.world_size % per_node:
            raise ValueError(
                f"ShardedPowerSGD: devices_per_node={per_node} does not divide the world size {self.world_size} "
                "(trainer.devices * trainer.num_nodes); pick a divisor or leave devices_per_node unset"
            )
        return self.world_size // per_node, per_node

    @override
    def setup_environment(self) -> None:
        """Start torch.distributed and build the ``(replicate, shard)`` mesh."""
        self._setup_distributed()
        self._device_mesh = init_device_mesh(self.root_device.type, self.layout, mesh_dim_names=("replicate", "shard"))
        self.lightning_module._device_mesh = self._device_mesh

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Every rank reads its own data (data parallel over the whole world)."""
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    # -- setup -----------------------------------------------------------------------------------------

    def shard(self, module: pl.LightningModule) -> None:
        """``fully_shard`` every resblock, then every direct child with trainable parameters, on the shard mesh."""
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            raise ValueError(
                f"ShardedPowerSGD shards the submodules of {type(module).__name__}, which owns parameters directly; "
                "move them into a submodule that is called through its forward"
            )
        mesh = self.device_mesh["shard"]
        for _, block in find_resblocks(module):
            fully_shard(block, mesh=mesh)
        for child in module.children():
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child, mesh=mesh)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        """`ModelParallelStrategy.setup` with the sharding done here and the cross-node reducer built."""
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        if not any(isinstance(p, DTensor) for p in self.model.parameters()):  # else configure_model sharded it
            self.shard(self.model)  # first: FSDP2 moves each shard to the device, never the whole model
        _materialize_distributed_module(self.model, self.root_device)  # a model built on the meta device
        self.model = self.precision_plugin.convert_module(self.model)  # after sharding: it maps parameters
        self.model_to_device()  # what is left (buffers, parameters outside the units)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
            self.reducer = self._build_reducer()

    def _build_reducer(self) -> CrossNodeReducer:
        nodes, per_node = self.layout
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        uncompressed = uncompressed_parameter_names(self.model, self.uncompressed)
        return CrossNodeReducer(
            named, uncompressed, self.device_mesh.get_group("replicate"), nodes,
            rank=max(self.rank // per_node, 1) if self.rank and nodes > 1 else None,  # one node: nothing to compress
            q_mode=self.q_mode, epsilon=self.epsilon, compress_small=self.compress_small, seed=self.seed,
        )  # fmt: skip

    # -- the step --------------------------------------------------------------------------------------

    @override
    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:  # fmt: skip
        """Run backward (Lightning's closure), reduce across nodes, then the precision plugin's step."""

        def closure_then_reduce() -> Any:
            result = closure()
            self.reduce_across_nodes()
            return result

        return super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)

    def reduce_across_nodes(self) -> None:
        """Average the shard gradients over nodes (PowerSGD from ``start_iter``); on a non-finite one, skip."""
        if self.reducer is None:
            return
        compress = self.lightning_module.trainer.global_step >= self.start_iter
        if not self.reducer.reduce(self._grad_scales(), compress=compress):
            return
        self.skipped_steps += 1
        if not isinstance(self.precision_plugin, PerResblockScaling):  # it sees the non-finite grads and skips
            for p in self.reducer.params:
                p.grad = None  # torch optimizers leave parameters without a gradient (and their moments) alone

    def _grad_scales(self) -> list[float] | None:
        """The per-resblock loss scale each gradient still carries (PerResblockScaling unscales after us)."""
        plugin = self.precision_plugin
        if not isinstance(plugin, PerResblockScaling) or plugin.scales is None:
            return None
        return [plugin.scales.effective[plugin._block_of[id(p)]] if id(p) in plugin._block_of else 1.0
                for p in self.reducer.params]  # fmt: skip

    # -- checkpoints -----------------------------------------------------------------------------------

    def _as_params(self, local: dict[str, Tensor]) -> dict[str, Tensor]:
        """Local shards named like parameters -> DTensors laid out like them (DCP saves and reshards those)."""
        params = dict(self.model.named_parameters())
        out = {}
        for name, t in local.items():
            p = params[name]
            out[name] = (
                DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                if isinstance(p, DTensor)
                else t
            )
        return out

    def _error_sums(self) -> dict[str, Tensor]:
        """Error-buffer sums over nodes as DTensors shaped like their parameters (collective)."""
        return self._as_params(self.reducer.error_sums()) if self.reducer is not None else {}

    def _shard_states(self, checkpoint: dict[str, Any], full: bool = False) -> dict[str, dict[str, Tensor]]:
        """Take the ``{parameter name: local shard}`` dicts (`lit_dalle.callbacks.EMA`) out of the callback states.

        Rank 0 alone writes the rest of the checkpoint, so these go into the distributed checkpoint as
        DTensors, and a marker stays in their place; with ``full`` they are gathered into full tensors in place
        (collective) and nothing is returned.
        """
        local_shapes = {n: local_tensor(p.detach()).shape for n, p in self.model.named_parameters()}
        shards = {}
        for key, state in checkpoint.get("callbacks", {}).items():
            for field, value in state.items() if isinstance(state, dict) else ():
                if (
                    isinstance(value, dict)
                    and value
                    and all(isinstance(t, Tensor) and local_shapes.get(n) == t.shape for n, t in value.items())
                ):
                    shards[f"{key}/{field}"] = self._as_params(value)
                    state[field] = _SHARDED
        if full:
            for path_key, values in shards.items():
                key, field = path_key.rsplit("/", 1)
                checkpoint["callbacks"][key][field] = {n: _full(t) for n, t in values.items()}
            return {}
        return shards

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """`ModelParallelStrategy.save_checkpoint` plus the error-buffer sums (sharded, or full on rank 0)."""
        sums = self._error_sums()
        callback_shards = self._shard_states(checkpoint, full=not self._save_distributed_checkpoint)
        if not self._save_distributed_checkpoint:
            checkpoint[_ERROR_KEY] = {k: _full(v) for k, v in sums.items()}
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        path = Path(self.broadcast(filepath))
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": checkpoint.pop("state_dict"), _ERROR_KEY: sums, _CALLBACK_KEY: callback_shards}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        _distributed_checkpoint_save(state, path)
        if self.global_rank == 0:
            torch.save(checkpoint, path / _METADATA_FILENAME)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load as `ModelParallelStrategy`, then the error buffers: saved sum / this run's number of nodes."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        saved = checkpoint.pop(_ERROR_KEY, None)
        path = Path(self.broadcast(checkpoint_path))
        shapes = {}
        if _is_sharded_checkpoint(path):
            from torch.distributed.checkpoint import FileSystemReader

            items = FileSystemReader(path).read_metadata().state_dict_metadata.items()
            shapes = {k: v.size for k, v in items if hasattr(v, "size")}  # tensors (not pickled bytes)
            self._load_shard_states(checkpoint, path, shapes)
        else:
            self._split_full_states(checkpoint)
        if self.reducer is None or not self.reducer.shards:
            return checkpoint
        local: dict[str, Tensor] = {}
        if _is_sharded_checkpoint(path):
            templates = {}
            for name, total in self._error_sums().items():  # the current layout, to be overwritten
                if shapes.get(f"{_ERROR_KEY}.{name}") == total.shape:
                    templates[name] = total
            if templates:
                _distributed_checkpoint_load({_ERROR_KEY: templates}, path)
            local = {k: local_tensor(v) for k, v in templates.items()}
        elif saved is not None:
            params = dict(zip(self.reducer.names, self.reducer.params))
            for name, full in saved.items():
                p = params.get(name)
                if p is not None and full.shape == p.shape:
                    local[name] = _local_chunk(full, p)
        missing = self.reducer.load_error_sums(local)
        if missing:
            rank_zero_warn(
                f"ShardedPowerSGD: no saved error buffer of the same shape for {len(missing)} compressed "
                f"parameter(s) (e.g. {missing[0]!r}); they start from zero"
            )
        return checkpoint

    def _split_full_states(self, checkpoint: dict[str, Any]) -> None:
        """Full-tensor callback entries of a full checkpoint -> this rank's shards."""
        params = dict(self.model.named_parameters())
        for state in checkpoint.get("callbacks", {}).values():
            for field, value in state.items() if isinstance(state, dict) else ():
                if (
                    isinstance(value, dict)
                    and value
                    and all(
                        isinstance(t, Tensor) and n in params and params[n].shape == t.shape for n, t in value.items()
                    )
                ):
                    state[field] = {n: _local_chunk(t, params[n]).clone() for n, t in value.items()}

    def _load_shard_states(self, checkpoint: dict[str, Any], path: Path, shapes: dict[str, torch.Size]) -> None:
        """Put the per-shard callback entries back, resharded to this run's layout."""
        params = dict(self.model.named_parameters())
        templates = {}
        for key, state in checkpoint.get("callbacks", {}).items():
            for field, value in state.items() if isinstance(state, dict) else ():
                if value == _SHARDED:
                    prefix = f"{_CALLBACK_KEY}.{key}/{field}."
                    names = [k[len(prefix) :] for k in shapes if k.startswith(prefix)]
                    if any(n not in params or params[n].shape != shapes[prefix + n] for n in names):
                        raise ValueError(
                            f"callback state {key!r} holds parameters this module lacks or shapes differently"
                        )
                    local = {n: torch.zeros_like(local_tensor(params[n].detach()), dtype=torch.float32) for n in names}
                    templates[f"{key}/{field}"] = self._as_params(local)
        if templates:
            _distributed_checkpoint_load({_CALLBACK_KEY: templates}, path)
        for path_key, values in templates.items():
            key, field = path_key.rsplit("/", 1)
            checkpoint["callbacks"][key][field] = {n: local_tensor(t) for n, t in values.items()}


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t  # collective for a DTensor


def _local_chunk(full: Tensor, param: Tensor) -> Tensor:
    """This rank's part of a full tensor, laid out like the (FSDP2 dim-0 sharded) parameter."""
    if not isinstance(param, DTensor):
        return full
    mesh = param.device_mesh
    chunks = full.chunk(mesh.size(), dim=0)  # FSDP2 shards dim 0 as torch.chunk does
    index = mesh.get_local_rank()
    return chunks[index] if index < len(chunks) else full[:0]


class DDPPowerSGD(DDPStrategy):
    """DDP with torch's ``powerSGD_hook`` across all ranks: the simple option (PAPER.md D.5).

    Torch's hook factorises whole bucketed matrices (not shards), orthogonalises with ``torch.linalg.qr``
    in fp32 and keeps its error buffers in memory only (they restart from zero on resume).

    Args:
        matrix_approximation_rank: PowerSGD rank per matrix.
        start_powerSGD_iter: plain all-reduce steps before compression (torch needs >= 2 with error feedback).
        warm_start: reuse Q between steps (False re-randomises it every step, which the paper found hurts).
        min_compression_rate: compress a matrix only if this rate is reached.
        use_error_feedback: keep torch's error buffers.
        orthogonalization_epsilon: torch's epsilon in Gram-Schmidt.
        random_seed: seed of the random Q.
        **kwargs: passed to `DDPStrategy` (``process_group_backend``, ``timeout``, ...).
    """

    strategy_name = "ddp_powersgd"

    def __init__(
        self,
        matrix_approximation_rank: int = 1,
        start_powerSGD_iter: int = 2,
        warm_start: bool = True,
        min_compression_rate: float = 2.0,
        use_error_feedback: bool = True,
        orthogonalization_epsilon: float = 0.0,
        random_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if use_error_feedback and start_powerSGD_iter < 2:
            raise ValueError(f"DDPPowerSGD: start_powerSGD_iter={start_powerSGD_iter}; torch's hook needs >= 2")
        self.hook_args = dict(matrix_approximation_rank=matrix_approximation_rank,
                              start_powerSGD_iter=start_powerSGD_iter, warm_start=warm_start,
                              min_compression_rate=min_compression_rate, use_error_feedback=use_error_feedback,
                              orthogonalization_epsilon=orthogonalization_epsilon, random_seed=random_seed)  # fmt: skip
        self.powersgd_state: torch_powersgd.PowerSGDState | None = None

    @override
    def configure_ddp(self) -> None:
        """Wrap the module in DDP, then register the hook (Lightning registers comm hooks on CUDA only)."""
        super().configure_ddp()
        self.powersgd_state = torch_powersgd.PowerSGDState(process_group=None, **self.hook_args)
        gloo = torch.distributed.get_backend() == "gloo"
        self.model.register_comm_hook(
            self.powersgd_state, _serial_powersgd_hook if gloo else torch_powersgd.powerSGD_hook
        )


def _serial_powersgd_hook(state: torch_powersgd.PowerSGDState, bucket):
    """Torch's hook, finished before the next bucket's starts (gloo).

    (No annotations on ``bucket`` and the result: DDP compares them with its classes, and postponed
    annotations are strings.)

    The hook issues its P and Q all-reduces from future callbacks; with several buckets these interleave
    differently on different ranks, and gloo, which matches collectives by issue order, fails ("Received data
    size doesn't match expected size"). Waiting per bucket keeps the order; NCCL does not need it.
    """
    done = torch.futures.Future()
    done.set_result(torch_powersgd.powerSGD_hook(state, bucket).wait())
    return done


StrategyRegistry.register(
    ShardedPowerSGD.strategy_name, ShardedPowerSGD, "FSDP2 inside a node, PowerSGD across nodes", override=True
)
StrategyRegistry.register(DDPPowerSGD.strategy_name, DDPPowerSGD, "DDP with torch's powerSGD_hook", override=True)
