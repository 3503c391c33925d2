import math

import pytest

from lit_dalle.callbacks.plateau import WarmupHalveOnPlateau


def test_linear_warmup_reaches_the_peak():
    s = WarmupHalveOnPlateau(peak_lr=4.5e-4, warmup_steps=5000)
    assert s.lr(0) == pytest.approx(4.5e-4 / 5000) and s.lr(2499) == pytest.approx(4.5e-4 / 2)
    assert s.lr(4999) == pytest.approx(4.5e-4) and s.lr(10**6) == pytest.approx(4.5e-4)


def test_halves_on_plateaus_at_most_five_times():
    s = WarmupHalveOnPlateau(peak_lr=1.0, warmup_steps=10, patience=50, smoothing=0.0)
    step = 0
    for step in range(10, 200):  # a falling loss: no reduction
        s.observe(step, 10.0 * 0.97**step)
    assert s.reductions == 0
    for step in range(200, 200 + 49):  # flat for less than the patience
        s.observe(step, 1.0)
    assert s.reductions == 0
    s.observe(step + 1, 1.0)
    assert s.reductions == 1 and s.lr(step) == pytest.approx(0.5)
    for k in range(1000):
        s.observe(step + 2 + k, 1.0)
    assert s.reductions == 5 and s.lr(10**6) == pytest.approx(1 / 32)  # the paper's 4.5e-4 / 32


def test_no_reduction_during_warmup_and_non_finite_losses_are_ignored():
    s = WarmupHalveOnPlateau(peak_lr=1.0, warmup_steps=100, patience=5, smoothing=0.0)
    for step in range(100):
        s.observe(step, 1.0)
    s.observe(100, math.nan)
    assert s.reductions == 0 and s.average == 1.0


def test_state_roundtrip_continues_identically():
    a = WarmupHalveOnPlateau(peak_lr=1.0, warmup_steps=0, patience=7)
    for step in range(30):
        a.observe(step, 1.0 + 0.001 * (step % 3))
    b = WarmupHalveOnPlateau(peak_lr=1.0, warmup_steps=0, patience=7)
    b.load_state_dict(a.state_dict())
    for step in range(30, 80):
        a.observe(step, 1.0)
        b.observe(step, 1.0)
    assert a.state_dict() == b.state_dict() and a.reductions > 0
