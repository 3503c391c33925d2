import math
import os
import pickle

import pytest
import torch

from lit_dalle.models.dvae import PRESETS, Decoder, Encoder, Fp32Conv2d, read_openai_checkpoint


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_preset_parameter_counts_on_meta():
    # PAPER.md A.2: encoder ~53.8 M, decoder ~43.8 M parameters.
    with torch.device("meta"):
        enc, dec = Encoder(**_enc(PRESETS["paper"])), Decoder(**_dec(PRESETS["paper"]))
    assert _count(enc) == pytest.approx(53.8e6, rel=2e-3)
    assert _count(dec) == pytest.approx(43.8e6, rel=2e-3)


def _enc(cfg):
    return {k: v for k, v in cfg.as_dict().items() if k != "n_init"}


def _dec(cfg):
    return cfg.as_dict()


@pytest.mark.parametrize("group_count, n_blk", [(4, 2), (3, 1), (2, 3)])
def test_shapes_names_and_post_gain(group_count, n_blk):
    enc = Encoder(vocab_size=32, n_hid=8, group_count=group_count, n_blk_per_group=n_blk)
    dec = Decoder(vocab_size=32, n_hid=8, group_count=group_count, n_blk_per_group=n_blk, n_init=16)
    f = 2 ** (group_count - 1)
    x = torch.rand(2, 3, 8 * f, 4 * f)
    logits = enc(x)
    assert logits.shape == (2, 32, 8, 4)
    out = dec(torch.softmax(logits, 1))
    assert out.shape == (2, 6, 8 * f, 4 * f)
    names = dict(enc.named_modules())
    # stable, addressable resblock names (STYLE.md 3)
    assert f"group_{group_count}.block_{n_blk}.res_path" in names
    assert "group_1.block_1.res_path.conv_4" in dict(dec.named_modules())
    assert enc.group_1.block_1.post_gain == 1 / (group_count * n_blk) ** 2
    # 1x1 id_path only where the width changes
    assert isinstance(enc.group_1.block_1.id_path, torch.nn.Identity)
    if group_count > 1:
        assert enc.group_2.block_1.id_path.kernel_size == (1, 1)


def test_conv_init_matches_paper():
    enc = Encoder(vocab_size=64, n_hid=64, group_count=1, n_blk_per_group=1)
    conv = enc.group_1.block_1.res_path.conv_2  # 16 -> 16, 3x3
    assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(16 * 9), rel=0.1)
    assert torch.all(conv.bias == 0)


def test_forward_tokens_equals_one_hot_forward():
    dec = Decoder(vocab_size=40, n_hid=8, group_count=2, n_blk_per_group=1, n_init=8)
    torch.nn.init.normal_(dec.input.bias)
    tokens = torch.randint(0, 40, (2, 3, 5))
    one_hot = torch.nn.functional.one_hot(tokens, 40).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(dec.forward_tokens(tokens), dec(one_hot), rtol=0, atol=1e-6)


def test_relaxation_convs_stay_fp32_under_autocast():
    conv = Fp32Conv2d(4, 4, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(torch.rand(1, 4, 2, 2)).dtype == torch.float32


def test_bad_inputs_are_named():
    enc = Encoder(vocab_size=16, n_hid=8, group_count=2, n_blk_per_group=1)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="n_hid=6"):
        Encoder(n_hid=6)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_openai_reader_runs_no_foreign_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    torch.save({"obj": _Evil()}, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(ValueError, match="not an OpenAI dVAE"):
        read_openai_checkpoint(str(path))
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_openai_reader_accepts_a_state_dict_of_released_names(tmp_path):
    enc = Encoder(vocab_size=16, n_hid=8, group_count=2, n_blk_per_group=1)
    released = {}
    for key, value in enc.state_dict().items():  # our names -> the released Conv2d's (w, b under blocks.)
        module, leaf = key.rsplit(".", 1)
        released[f"blocks.{module}.{ {'weight': 'w', 'bias': 'b'}[leaf] }"] = value
    torch.save(released, tmp_path / "enc.pt")
    state, sizes = read_openai_checkpoint(str(tmp_path / "enc.pt"))
    assert sizes == {
        "kind": "encoder",
        "group_count": 2,
        "n_blk_per_group": 1,
        "channels": 3,
        "n_hid": 8,
        "vocab_size": 16,
        "n_layers": None,
    }
    assert state.keys() == enc.state_dict().keys()
