"""CrossNodeReducer in one process (one node, no communication): PowerSGD algebra and non-finite rules."""

from __future__ import annotations

import pytest
import torch
import yaml
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

from lit_dalle.cli import main
from lit_dalle.models.transformer import Transformer, TransformerConfig
from lit_dalle.plugins import CrossNodeReducer, DDPPowerSGD, ShardedPowerSGD, uncompressed_parameter_names


def reducer_for(*shapes: tuple[int, ...], rank: int = 2, **kwargs) -> tuple[CrossNodeReducer, list[nn.Parameter]]:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.zeros(shape)) for shape in shapes]
    for p in params:
        p.grad = torch.randn(p.shape)
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    return CrossNodeReducer(named, uncompressed=set(), group=None, nodes=1, rank=rank, **kwargs), params


def test_which_parameters_are_compressed():
    config = TransformerConfig(text_vocab=16, image_vocab=16, text_len=4, grid=2, depth=1, width=32, heads=2,
                               mask_schedule="full")  # fmt: skip
    net = Transformer(config)
    heads = {"text_head.weight", "image_head.weight"}  # the unembeddings
    assert uncompressed_parameter_names(net) == net.no_decay_parameter_names() | heads  # + embeddings, gains, biases
    assert uncompressed_parameter_names(net, patterns=()) == net.no_decay_parameter_names()
    named = list(net.named_parameters())
    reducer = CrossNodeReducer(named, uncompressed_parameter_names(net), group=None, nodes=2, rank=2)
    compressed = {reducer.names[s.index] for s in reducer.shards}
    assert (
        compressed == {n for n, p in named if p.dim() == 2 and n.startswith("blocks.")} - net.no_decay_parameter_names()
    )
    assert len(compressed) == 4 and all(n.endswith("weight") for n in compressed)
    # a matrix whose factors would not be smaller than itself goes uncompressed unless asked
    assert not reducer_for((4, 3), rank=2)[0].shards
    assert reducer_for((4, 3), rank=2, compress_small=True)[0].shards[0].rank == 2


def test_full_rank_reconstructs_the_gradient_and_low_rank_keeps_the_rest_as_error():
    reducer, (p,) = reducer_for((12, 5), rank=5, compress_small=True)
    g = p.grad.clone()
    assert not reducer.reduce()
    assert torch.allclose(p.grad, g, atol=1e-5)  # rank = min(shape): P Q'^T is the gradient
    assert reducer.shards[0].error.abs().max() < 1e-5

    reducer, (p,) = reducer_for((12, 8), rank=2)
    g = p.grad.clone()
    assert not reducer.reduce()
    shard = reducer.shards[0]
    assert torch.linalg.matrix_rank(p.grad) == 2
    assert torch.allclose(p.grad + shard.error, g, atol=1e-5)  # error feedback: nothing is lost
    p.grad = torch.zeros_like(g)
    reducer.reduce()  # the next step sends (part of) what the first one left behind
    assert p.grad.norm() > 0.1 * g.norm()


def test_transposed_shards_and_q_modes():
    reducer, _ = reducer_for((5, 12), rank=2)  # rows < columns: factorised as its transpose
    shard = reducer.shards[0]
    assert shard.transpose and shard.q.shape == (5, 2)
    q = shard.q.clone()
    reducer.reduce()
    assert torch.equal(shard.q, q)  # fixed Q (PAPER.md D.2 fn. 10)
    reducer, _ = reducer_for((5, 12), rank=2, q_mode="warm_start")
    q = reducer.shards[0].q.clone()
    reducer.reduce()
    assert not torch.equal(reducer.shards[0].q, q)
    with pytest.raises(ValueError, match="q_mode"):
        reducer_for((5, 12), q_mode="resample")


def test_non_finite_gradient_skips_and_is_not_added_to_the_error_buffer():
    reducer, (p, b) = reducer_for((12, 8), (8,), rank=2)
    reducer.reduce()
    error = reducer.shards[0].error.clone()
    p.grad[0, 0] = float("inf")
    g, gb = p.grad.clone(), b.grad.clone()
    assert reducer.reduce()  # skip
    assert torch.equal(p.grad, g) and torch.equal(b.grad, gb)  # left for the precision plugin to see
    # P came from the finite buffer alone: the buffer drops P Q'^T as usual (D.3 step 12)
    assert torch.isfinite(reducer.shards[0].error).all() and reducer.shards[0].error.norm() < error.norm()


def test_a_non_finite_buffer_is_zeroed_and_a_finite_one_kept_when_p_is_not_finite():
    reducer, (p,) = reducer_for((12, 8), rank=2)
    reducer.shards[0].error.fill_(float("nan"))
    assert reducer.reduce()
    assert torch.equal(reducer.shards[0].error, torch.zeros(12, 8))
    reducer, (p,) = reducer_for((12, 8), rank=2)
    p.grad.fill_(3e38)  # finite, but P = E Q overflows
    assert reducer.reduce()
    assert torch.equal(reducer.shards[0].error, torch.full((12, 8), 3e38))


def test_error_sums_round_trip_divided_by_the_number_of_nodes():
    reducer, _ = reducer_for((12, 8), (4, 4), rank=2)
    reducer.reduce()
    sums = reducer.error_sums()  # one node: the sums are the buffers
    assert set(sums) == {"p0"}  # (4, 4) at rank 2 is not worth compressing
    reducer.nodes = 2
    assert reducer.load_error_sums({"p0": sums["p0"] * 2}) == []
    assert torch.allclose(reducer.shards[0].error, sums["p0"])
    assert reducer.load_error_sums({"p0": torch.zeros(3, 3)}) == ["p0"]  # another shape: starts from zero
    assert reducer.shards[0].error.abs().sum() == 0


def test_strategies_are_registered_and_validate_their_arguments():
    assert isinstance(StrategyRegistry.get("shard_powersgd"), ShardedPowerSGD)
    assert isinstance(StrategyRegistry.get("ddp_powersgd"), DDPPowerSGD)
    with pytest.raises(ValueError, match="start_powerSGD_iter"):
        DDPPowerSGD(start_powerSGD_iter=1)
    with pytest.raises(ValueError, match="q_mode"):
        ShardedPowerSGD(q_mode="resample")
    with pytest.raises(ValueError, match="rank"):
        ShardedPowerSGD(rank=-1)


def test_yaml_selects_the_strategy_with_init_args(tmp_path, capsys):
    config = tmp_path / "strategy.yaml"
    config.write_text(
        "trainer:\n  num_nodes: 2\n  devices: 8\n  strategy:\n    class_path: lit_dalle.plugins.ShardedPowerSGD\n"
        "    init_args: {rank: 896, q_mode: warm_start, start_iter: 10}\n"
    )
    with pytest.raises(SystemExit):
        main(["fit", "--model=tiny_model.TinyModel", "--config", str(config), "--print_config"])
    strategy = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    assert strategy["class_path"] == "lit_dalle.plugins.ShardedPowerSGD"
    assert strategy["init_args"] | {"rank": 896, "q_mode": "warm_start", "start_iter": 10} == strategy["init_args"]
