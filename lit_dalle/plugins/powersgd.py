"""PowerSGD across nodes for sharded gradients (Ramesh et al. 2021, Sec. 2.5, App. E.2; PAPER.md D.2-D.3).

`CrossNodeReducer` runs after backward, once the in-node reduce-scatter (FSDP2) has left every rank with its
own shard's gradient averaged over the devices of its node. It averages those shard gradients over the
same-ordinal ranks of all nodes (the "replicate" process group):

- matrices (weights outside the uncompressed set): PowerSGD with error feedback, each *local shard*
  factorised on its own (D.2 fn. 9, not a factorisation of the full matrix). With the error buffer E of a
  shard (its rows and columns transposed so that rows >= columns) and step 2's ``E += g / scale``::

      P = mean_nodes(E @ Q)                      # [n, r], one grouped all-reduce for all shards (step 4)
      P = householder_qr(P + 1e-6 * I_{n x r})   # orthonormal columns (step 5; torch.linalg.qr)
      Q' = mean_nodes(E.T @ P)                   # [m, r], one grouped all-reduce (steps 6-7)
      g = P @ Q'.T                               # the decompressed gradient (step 11)
      E = E - P @ Q'.T                           # leaves local - remote (step 12)

  Q is a random Gaussian fixed at the start of training (``q_mode="fixed"``, fn. 10: the paper's choice) or
  the previous step's Q' (``"warm_start"``, Vogels et al. 2019);
- embeddings, unembeddings, gains, biases (the caller's uncompressed names), 1-D tensors, and matrices whose factors
  would not be smaller than the shard (unless ``compress_small``): one grouped fp32 all-reduce (step 8).

Non-finite gradients (steps 2, 10-12): a shard with a non-finite gradient does not add it to its error
buffer; one flag summed over the world tells every rank to skip the update. A buffer is decreased by P Q'^T
when its P and Q' are finite (even on a skipped step, as in the paper), otherwise kept when finite and zeroed
when not.
Error buffers are fp32 here (the paper's 1-6-9 16-bit format is not reproduced).

Every cross-node all-reduce goes through `CrossNodeReducer._all_reduce`, which counts its bytes
(``last_step_bytes``, ``total_bytes``) so tests and benchmarks can measure the compression.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["CrossNodeReducer", "local_tensor"]

QMode = Literal["fixed", "warm_start"]


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class _Shard:
    """One compressed local shard: its error buffer (shard shape) and its Q (``[m, r]``, m the shorter side)."""

    def __init__(self, index: int, shape: torch.Size, rank: int, q: Tensor, device: torch.device) -> None:
        self.index = index  # position in the reducer's parameter list
        self.transpose = shape[0] < shape[-1]  # work on [n, m] with n >= m (PAPER.md D.3 "Transposition")
        self.rank = rank
        self.q = q  # [m, r]
        self.error = torch.zeros(shape, dtype=torch.float32, device=device)

    def matrix(self, t: Tensor) -> Tensor:
        """``[n, m]`` view of a shard-shaped tensor."""
        return t.t() if self.transpose else t


class CrossNodeReducer:
    """Average local shard gradients over nodes: PowerSGD for matrices, one fp32 all-reduce for the rest.

    Args:
        named_params: ``(name, parameter)`` in the same order on every rank; gradients are read from and
            written to ``parameter.grad`` (a DTensor's local shard under FSDP2).
        uncompressed: names that always take the grouped fp32 all-reduce (embeddings, unembeddings, gains, biases).
        group: the process group of this rank's same-ordinal peers on the other nodes (None: the world).
        nodes: number of nodes (the size of ``group``).
        rank: PowerSGD rank per local shard (``total rank / devices per node``, PAPER.md D.2); None or 0:
            no compression, every gradient takes the fp32 all-reduce.
        q_mode: "fixed" (a random Gaussian Q drawn once, PAPER.md D.2 fn. 10) or "warm_start" (reuse Q').
        epsilon: added to P's diagonal before orthogonalisation (PAPER.md D.3 step 5: 1e-6).
        compress_small: compress a matrix even when ``rank * (n + m) >= n * m`` (used to test full rank).
        seed: seed of the fixed Q matrices (the same on every rank, so same-ordinal peers agree).
    """

    def __init__(
        self,
        named_params: Sequence[tuple[str, Tensor]],
        uncompressed: Collection[str],
        group: dist.ProcessGroup | None,
        nodes: int,
        rank: int | None,
        q_mode: QMode = "fixed",
        epsilon: float = 1e-6,
        compress_small: bool = False,
        seed: int = 0,
    ) -> None:
        if q_mode not in ("fixed", "warm_start"):
            raise ValueError(f"q_mode={q_mode!r}: use 'fixed' (the paper's choice) or 'warm_start'")
        self.names = [name for name, _ in named_params]
        self.params = [p for _, p in named_params]
        self.group, self.nodes, self.q_mode, self.epsilon = group, nodes, q_mode, epsilon
        self.shards: list[_Shard] = []
        self.dense: list[int] = []  # indices of the parameters in the grouped fp32 all-reduce
        for index, (name, param) in enumerate(named_params):
            local = local_tensor(param.detach())
            n, m = max(local.shape, default=0), min(local.shape, default=0)
            r = min(rank or 0, m)
            small = r * (n + m) >= n * m and not compress_small
            if local.dim() != 2 or name in uncompressed or r == 0 or small:
                self.dense.append(index)
                continue
            gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
            q = torch.randn(m, r, generator=gen).to(local.device)
            self.shards.append(_Shard(index, local.shape, r, q, local.device))
        self.last_step_bytes = 0  # bytes this rank put into cross-node all-reduces in the last `reduce`
        self.total_bytes = 0

    # -- communication ---------------------------------------------------------------------------------

    def _all_reduce(self, t: Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
        """All-reduce in place (gloo has no AVG: callers divide) and count the payload."""
        self.last_step_bytes += t.numel() * t.element_size()
        dist.all_reduce(t, op=op, group=group)
        return t

    def _mean_over_nodes(self, tensors: list[Tensor]) -> list[Tensor]:
        """One grouped all-reduce: the node mean of each tensor, same shapes (fp32)."""
        if not tensors:
            return []
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        if self.nodes > 1:
            self._all_reduce(flat, self.group).div_(self.nodes)
        return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    # -- the step --------------------------------------------------------------------------------------

    def _grads(self) -> list[Tensor]:
        grads = []
        for p in self.params:
            g = local_tensor(p.grad) if p.grad is not None else None
            grads.append(g if g is not None else torch.zeros_like(local_tensor(p.detach())))
        return grads

    @torch.no_grad()
    def reduce(self, scales: Sequence[float] | None = None, compress: bool = True) -> bool:
        """Average the gradients over nodes in place; return True when the update must be skipped everywhere.

        Args:
            scales: per parameter, the factor its gradient carries (a per-resblock loss scale); error
                buffers hold unscaled gradients (D.3 step 2) and the written gradient is scaled again.
            compress: False before ``start_iter``: every gradient takes the fp32 all-reduce.

        On a skip, the gradients are left as backward made them (non-finite somewhere), so a precision
        plugin that checks them skips the step too.
        """
        self.last_step_bytes = 0
        grads = self._grads()
        scales = scales or [1.0] * len(grads)
        shards = self.shards if compress else []
        dense = sorted(self.dense + [s.index for s in self.shards]) if not compress else self.dense
        bad = torch.zeros((), device=grads[0].device) if grads else torch.zeros(())
        for g in grads:  # any non-finite local gradient (max-abs is inf/nan exactly when one entry is)
            bad = bad + (~torch.isfinite(g.abs().amax() if g.numel() else g.new_zeros(()))).float()

        # Step 2: E_new = E + g / scale where g is finite; P = E_new @ Q (step 3), grouped mean (step 4).
        errors, ps = [], []
        for s in shards:
            g = grads[s.index].float() / scales[s.index]
            finite = torch.isfinite(g).all()
            errors.append(s.error + torch.where(finite, g, torch.zeros_like(g)))
            ps.append(s.matrix(errors[-1]) @ s.q)
        ps = self._mean_over_nodes(ps)
        qs, p_ok = [], []
        for i, (s, e) in enumerate(zip(shards, errors)):
            p_ok.append(torch.isfinite(ps[i]).all())
            p = torch.where(p_ok[i], ps[i], torch.zeros_like(ps[i]))  # QR of a non-finite matrix is undefined
            p.diagonal().add_(self.epsilon)  # + eps I_{n x r} (step 5)
            ps[i] = torch.linalg.qr(p).Q  # Householder QR, reduced: [n, r]
            qs.append(s.matrix(e).t() @ ps[i])  # [m, r] (step 6)
        qs = self._mean_over_nodes(qs)  # step 7
        decompressed = []
        for s, e, p, q, pok in zip(shards, errors, ps, qs, p_ok):
            ok = pok & torch.isfinite(q).all()
            d = s.matrix(p @ q.t())  # shard shape
            d = torch.where(ok, d, torch.zeros_like(d))
            # Step 12: local - remote when P, Q are finite; else keep a finite buffer; else zero it.
            keep = torch.where(torch.isfinite(e).all(), e, torch.zeros_like(e))
            s.error = torch.where(ok, e - d, keep)
            if self.q_mode == "warm_start":
                s.q = torch.where(ok, q, s.q)
            bad = bad + (~ok).float()
            decompressed.append(d)
        means = self._mean_over_nodes([grads[i] for i in dense])  # step 8: one grouped fp32 all-reduce

        # Step 10: one flag over the world, so every rank skips the same updates.
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            bad = self._all_reduce(bad.reshape(1).float(), None).reshape(())
        skip = bool(bad > 0)
        if not skip:
            for s, d in zip(shards, decompressed):
                grads[s.index].copy_(d * scales[s.index])
            for i, mean in zip(dense, means):
                grads[i].copy_(mean)
        self.total_bytes += self.last_step_bytes
        return skip

    # -- checkpoints -----------------------------------------------------------------------------------

    @torch.no_grad()
    def error_sums(self) -> dict[str, Tensor]:
        """Each compressed shard's error buffer summed over the same-ordinal ranks (collective over nodes).

        PAPER.md D.3: by linearity only the sum matters; one copy per shard ordinal instead of one per node.
        """
        sums = {}
        for s in self.shards:
            total = s.error.clone()
            if self.nodes > 1:
                dist.all_reduce(total, group=self.group)
            sums[self.names[s.index]] = total
        return sums

    @torch.no_grad()
    def load_error_sums(self, sums: dict[str, Tensor]) -> list[str]:
        """Set each error buffer to its saved sum divided by this run's number of nodes.

        Returns:
            The names of the compressed shards that got no buffer (absent, or another shape): they start
            from zero.
        """
        missing = []
        for s in self.shards:
            name = self.names[s.index]
            saved = sums.get(name)
            if saved is None or saved.shape != s.error.shape:
                missing.append(name)
                s.error.zero_()
            else:
                s.error.copy_(saved.to(s.error.device, torch.float32) / self.nodes)
        return missing
