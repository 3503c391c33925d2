"""A tiny transformer LightningModule and token data for the strategy tests (no tokenizer, no DVAE).

Its parameters cover every class PAPER.md D.2 distinguishes: embeddings, gains and biases (uncompressed)
and weight matrices (compressed), in resblocks (`lit_dalle.models.transformer.Transformer`).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lit_dalle.models.transformer import Transformer, TransformerConfig

TEXT_LEN, GRID, VOCAB = 4, 2, 16


def tokens(count: int = 64, seed: int = 0) -> torch.Tensor:
    """``[count, TEXT_LEN + GRID**2]`` text + image tokens counting up from a random start (learnable; seeded)."""
    start = torch.randint(0, VOCAB, (count, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(TEXT_LEN + GRID * GRID)) % VOCAB


class TinyLM(L.LightningModule):
    """Cross-entropy of a tiny `Transformer` on `Tokens`, SGD with momentum (robust to rounding, unlike Adam).

    Args:
        width: model width.
        depth: layers (two resblocks each).
        lr: SGD learning rate.
        batch_size: rows per rank and step. Step k of rank r of W reads rows ``(k W + r) b ... + b`` of
            `tokens`, so W ranks of b see the rows of one process of W * b, also across a resume.
        inject_inf: ``(step, rank)``: write an inf into that rank's local gradient shard after backward.
    """

    def __init__(
        self,
        width: int = 32,
        depth: int = 2,
        lr: float = 0.03,
        batch_size: int = 2,
        inject_inf: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        config = TransformerConfig(text_vocab=VOCAB, image_vocab=VOCAB, text_len=TEXT_LEN, grid=GRID, depth=depth,
                                   width=width, heads=2, mask_schedule="full", attention_backend="sdpa")  # fmt: skip
        self.net = Transformer(config)
        self.lr, self.batch_size, self.inject_inf = lr, batch_size, inject_inf
        self.losses: list[float] = []
        self.tokens = tokens()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        first = (self.trainer.global_step * self.trainer.world_size + self.trainer.global_rank) * self.batch_size
        batch = self.tokens[torch.arange(first, first + self.batch_size) % len(self.tokens)]
        text, image = batch[:, :TEXT_LEN], batch[:, TEXT_LEN:]
        text_logits, image_logits = self.net(text, image)
        loss = F.cross_entropy(text_logits.flatten(0, 1), text.flatten()) + F.cross_entropy(
            image_logits.flatten(0, 1), image.flatten()
        )
        self.losses.append(loss.item())
        return loss

    def on_after_backward(self) -> None:
        if self.inject_inf and self.inject_inf == (self.trainer.global_step, self.trainer.global_rank):
            grad = self.net.blocks[0].mlp.res_path.fc.weight.grad
            (grad.to_local() if hasattr(grad, "to_local") else grad)[0, 0] = float("inf")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(100_000), batch_size=1)  # drives the loop; `training_step` picks the rows

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters as full tensors (gathering FSDP2 shards; collective under sharding)."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in module.named_parameters()
    }
