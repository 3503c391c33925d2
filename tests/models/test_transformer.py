"""The Prior's transformer: cached decoding equals a full pass, causality, masks, fp32 logits, flex == SDPA."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator

import pytest
import torch

from lit_dalle.models.attention import pick_backend
from lit_dalle.models.masks import build_mask, has_flex_attention
from lit_dalle.models.transformer import TEXT_PAD, ResBlock, Transformer, TransformerConfig, sample_logits

TEXT_LEN, GRID, N = 3, 4, 16
SCHEDULES = ["row", "column", "conv", "full", ("row", "column", "conv", "full")]
flex_only = pytest.mark.skipif(not has_flex_attention(), reason="FlexAttention needs torch >= 2.5")
no_eager_flex_warning = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny tensors: with 2 OpenMP threads on a shared 2-core machine each op waited ~10 ms (measured), 1 takes ~20 us.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(schedule: str | tuple[str, ...] = "paper", depth: int = 4, **kw: object) -> Transformer:
    torch.manual_seed(0)
    config = TransformerConfig(
        text_vocab=20,
        image_vocab=16,
        text_len=TEXT_LEN,
        grid=GRID,
        depth=depth,
        width=32,
        heads=2,
        mask_schedule=schedule,
        conv_kernel=3,
        **kw,
    )
    return Transformer(config).eval()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 20, (2, TEXT_LEN), generator=gen)
    text[1, 1:] = TEXT_PAD  # a one-token caption
    return text, torch.randint(0, 16, (2, N), generator=gen)


# ------------------------------------------------------------------------------------------ the stream
def test_shapes_and_names() -> None:
    model = tiny(depth=4)
    text, image = batch()
    text_logits, image_logits = model(text, image)
    assert text_logits.shape == (2, TEXT_LEN, 20) and image_logits.shape == (2, N, 16)
    # The padded text is the text target: TEXT_PAD is cross-entropy's default ignore_index.
    loss = torch.nn.functional.cross_entropy(text_logits.transpose(1, 2), text)
    assert torch.isfinite(loss) and text[1, 1:].eq(TEXT_PAD).all()
    assert model(text)[1].shape == (2, 1, 16)  # caption only: the logits of image token 0
    assert model(text, image[:, :5])[1].shape == (2, 6, 16)
    names = dict(model.named_modules())
    assert isinstance(names["blocks.3.attn"], ResBlock) and isinstance(names["blocks.3.mlp"], ResBlock)
    assert "blocks.3.attn.res_path.qkv" in names and "blocks.3.mlp.res_path.fc" in names
    assert sum(isinstance(m, ResBlock) for m in model.modules()) == 2 * 4
    assert [b.mask_kind for b in model.blocks] == ["row", "column", "row", "conv"]


def test_pads_are_per_position_and_validated() -> None:
    model = tiny()
    tokens = torch.tensor([[0, TEXT_PAD, TEXT_PAD, TEXT_PAD]])  # SOT, then three pad slots
    emb = model.embed(tokens) - model.embed.text_pos(torch.arange(4))  # token parts only
    assert not torch.allclose(emb[0, 1], emb[0, 2]) and not torch.allclose(emb[0, 2], emb[0, 3])
    with pytest.raises(ValueError, match="text ids"):
        model(torch.tensor([[20, 1, 2]]))
    with pytest.raises(ValueError, match="image ids"):
        model(torch.tensor([[1, 2, 3]]), torch.tensor([[16]]))
    with pytest.raises(ValueError, match="text_len=3"):
        model(torch.tensor([[1, 2]]))


def test_config_fails_early_and_auto_is_sdpa_on_cpu() -> None:
    with pytest.raises(ValueError, match="unknown mask schedule"):
        TransformerConfig(mask_schedule="diagonal")
    with pytest.raises(ValueError, match="one per layer"):
        TransformerConfig(depth=2, mask_schedule=("row",))
    with pytest.raises(ValueError, match="multiple of heads"):
        TransformerConfig(width=100, heads=3)
    with pytest.raises(ValueError, match="odd"):
        TransformerConfig(conv_kernel=4)
    assert pick_backend("auto", torch.device("cpu")) == "sdpa"
    assert pick_backend("flex", torch.device("cpu")) == "flex"


def test_init_scales_residual_projections() -> None:
    model = Transformer(
        TransformerConfig(text_vocab=64, image_vocab=64, text_len=4, grid=8, depth=8, width=256, heads=4)
    )
    assert model.blocks[0].mlp.res_path.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.res_path.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_no_decay_names_gains_biases_embeddings() -> None:
    model = tiny(depth=2)
    names = model.no_decay_parameter_names()
    assert {"embed.text.weight", "embed.row.weight", "final_norm.weight", "blocks.1.mlp.res_path.fc.bias"} <= names
    assert "blocks.1.attn.res_path.norm.weight" in names and "blocks.1.attn.res_path.qkv.weight" not in names
    assert "image_head.weight" not in names and names <= dict(model.named_parameters()).keys()


def test_paper_size_on_meta() -> None:
    with torch.device("meta"):
        model = Transformer(TransformerConfig())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(12.3e9, rel=0.01)


# ---------------------------------------------------------------------------------------- the KV cache
@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
@pytest.mark.parametrize("prefix", [0, GRID])  # caption only, and caption plus the first row of the image
def test_cached_steps_equal_full_forward(schedule: str | tuple[str, ...], prefix: int) -> None:
    model = tiny(schedule)
    text, image = batch()
    with torch.no_grad():
        _, full = model(text, image)  # [B, N, V]
        cache = model.new_cache()
        step_logits = [model.prefill(text, image[:, :prefix], cache=cache)]
        for m in range(prefix, N - 1):
            step_logits.append(model.decode_step(image[:, m], cache))
    assert cache.length == model.config.seq_len
    torch.testing.assert_close(torch.stack(step_logits, dim=1), full[:, prefix:], atol=1e-4, rtol=0)


def test_cached_token_by_token_from_sot_equals_full_stream() -> None:
    model = tiny(("row", "column", "conv", "full"))
    text, image = batch()
    tokens = model.stream(text, image)  # [B, T]
    with torch.no_grad():
        full = model.forward_stream(tokens)
        cache = model.new_cache()
        steps = torch.cat([model.forward_stream(tokens[:, s : s + 1], cache=cache) for s in range(tokens.shape[1])], 1)
        chunked_cache = model.new_cache()
        chunks = torch.cat([model.forward_stream(c, cache=chunked_cache) for c in tokens.split([5, 7, 7], 1)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunks, full, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------- causality and masks
def test_future_tokens_do_not_change_earlier_logits() -> None:
    model = tiny(("row", "column", "conv", "full"))
    text, image = batch()
    text_logits, image_logits = model(text, image)
    for j in (0, 7, 14):  # change image token j: logits of tokens 0 .. j (which predict them) stay
        changed = image.clone()
        changed[:, j] = (changed[:, j] + 1) % 16
        t2, i2 = model(text, changed)
        torch.testing.assert_close(t2, text_logits)
        torch.testing.assert_close(i2[:, : j + 1], image_logits[:, : j + 1])
        assert not torch.allclose(i2[:, j + 1 :], image_logits[:, j + 1 :])
    changed = text.clone()
    changed[0, 1] = (changed[0, 1] + 1) % 20
    t2, _ = model(changed, image)
    torch.testing.assert_close(t2[:, :2], text_logits[:, :2])
    assert not torch.allclose(t2[:, 2:], text_logits[:, 2:])


@pytest.mark.parametrize("kind", ["row", "column", "conv", "full"])
def test_one_layer_sees_exactly_its_mask(kind: str) -> None:
    model = tiny(kind, depth=1)
    text, image = batch()
    _, base = model(text, image)  # image_logits[:, m + 1] comes from the position holding image token m
    allowed = build_mask(kind, TEXT_LEN, GRID, 3)[TEXT_LEN + 1 :, TEXT_LEN + 1 :]  # [N - 1, N - 1] tokens m, n
    for n in range(N - 1):
        changed = image.clone()
        changed[:, n] = (changed[:, n] + 1) % 16
        _, out = model(text, changed)
        moved = (out[:, 1:] - base[:, 1:]).abs().amax(dim=(0, 2)) > 1e-6  # [N - 1] over query tokens m
        assert torch.equal(moved, allowed[:, n]), (n, moved.nonzero().flatten(), allowed[:, n].nonzero().flatten())


# -------------------------------------------------------------------------------------------- precision
def test_logits_are_fp32_under_bf16_autocast() -> None:
    model = tiny(depth=2)
    text, image = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        text_logits, image_logits = model(text, image)
        step = model.prefill(text, image[:, :4], cache=model.new_cache())
    assert text_logits.dtype == image_logits.dtype == step.dtype == torch.float32
    assert model.blocks[0].attn.res_path.qkv.weight.dtype == torch.float32


# ----------------------------------------------------------------------------------------- generation
def test_generate_image_tokens() -> None:
    model = tiny()
    text, image = batch()
    gen = torch.Generator()
    a = model.generate_image_tokens(text, generator=gen.manual_seed(3))
    b = model.generate_image_tokens(text, generator=gen.manual_seed(3))
    assert a.shape == (2, N) and torch.equal(a, b) and a.min() >= 0 and a.max() < 16
    completed = model.generate_image_tokens(text, image_prefix=image[:, :8], top_k=3, generator=gen)
    assert torch.equal(completed[:, :8], image[:, :8])
    greedy = model.generate_image_tokens(text, temperature=0)
    assert torch.equal(model.generate_image_tokens(text, top_k=1, generator=gen), greedy)
    assert torch.equal(model.generate_image_tokens(text, top_p=1e-6, generator=gen), greedy)
    _, logits = model(text, greedy)  # greedy: each token is the argmax given the ones before it
    assert torch.equal(logits.argmax(-1), greedy)


def test_sample_logits_respects_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_logits(logits, top_k=2, generator=gen).tolist()) == {0, 1}
    assert set(sample_logits(logits, top_p=0.8, generator=gen).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert set(sample_logits(logits, top_p=0.81, generator=gen).tolist()) == {0, 1, 2}


# ------------------------------------------------------------------------------------ flex == dense
@flex_only
@no_eager_flex_warning
def test_flex_forward_equals_sdpa_on_cpu() -> None:
    sdpa = tiny(("row", "column", "conv", "full"), attention_backend="sdpa")
    flex = tiny(("row", "column", "conv", "full"), attention_backend="flex")
    text, image = batch()
    with torch.no_grad():
        for a, b in zip(sdpa(text, image), flex(text, image)):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        flex(text, image)


@flex_only
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LIT_DALLE_COMPILE_TESTS") != "1", reason="compiling flex takes ~35 s on CPU")
def test_compiled_flex_forward_equals_sdpa_on_cpu() -> None:
    from torch.nn.attention.flex_attention import flex_attention

    from lit_dalle.models.masks import flex_block_mask

    dense = build_mask("row", 8, 8)
    q, k, v = torch.randn(3, 2, 2, dense.shape[0], 16).unbind(0)
    out = torch.compile(flex_attention)(q, k, v, block_mask=flex_block_mask("row", 8, 8))
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense))


@flex_only
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_forward_backward_equals_sdpa_on_cuda() -> None:
    config = TransformerConfig(
        text_vocab=64, image_vocab=64, text_len=16, grid=8, depth=4, width=128, heads=2, conv_kernel=3
    )
    text = torch.randint(0, 64, (2, 16), device="cuda")
    image = torch.randint(0, 64, (2, 64), device="cuda")
    grads, outputs = [], []
    for backend in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = Transformer(dataclasses.replace(config, attention_backend=backend)).cuda()
        text_logits, image_logits = model(text, image)
        (text_logits.logsumexp(-1).mean() + image_logits.logsumexp(-1).mean()).backward()
        outputs.append((text_logits, image_logits))
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*outputs):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)
    # "auto" is flex on CUDA for a full pass; cached decoding (SDPA on mask rows) still matches it there.
    model = Transformer(config).cuda().eval()
    with torch.no_grad():
        _, full = model(text, image)
        cache = model.new_cache()
        steps = [model.prefill(text, image[:, :8], cache=cache)]
        steps += [model.decode_step(image[:, m], cache) for m in range(8, 63)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 8:], atol=1e-4, rtol=0)
