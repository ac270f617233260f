"""Penalty schedules in closed form, and the scaled dual kept consistent when lambda moves."""

from __future__ import annotations

import math

import pytest
import torch

from core_settings import admm_settings
from elsa.optim.admm import ADMM, ADMMSettings, PenaltySchedule
from elsa.optim.projection import magnitude_score, topk_mask
from elsa.optim.schedules import dual_rescale_factor, schedule_value
from elsa.targets import Target


@pytest.mark.parametrize("total", [1, 7, 100])
def test_schedules_closed_form(total):
    l0, l1 = 2e-3, 5e-2
    for step in range(-2, total + 3):
        t = min(max(step / total, 0.0), 1.0)
        assert schedule_value("constant", l0, l1, step, total) == l0
        assert schedule_value("linear", l0, l1, step, total) == pytest.approx(l0 * (1 - t) + l1 * t, rel=1e-12)
        assert schedule_value("cosine", l0, l1, step, total) == pytest.approx(
            l0 + (l1 - l0) * (1 - math.cos(math.pi * t)) / 2, rel=1e-12
        )
        assert schedule_value("exponential", l0, l1, step, total) == pytest.approx(
            math.exp(math.log(l0) + t * (math.log(l1) - math.log(l0))), rel=1e-12
        )
        assert PenaltySchedule(l0, l1, "cosine").at(step, total) == schedule_value("cosine", l0, l1, step, total)
    # end points, midpoint and monotonicity of the cosine
    assert schedule_value("cosine", 0.0, 1.0, 0, 10) == 0.0
    assert schedule_value("cosine", 0.0, 1.0, 10, 10) == pytest.approx(1.0)
    assert schedule_value("cosine", 0.0, 1.0, 5, 10) == pytest.approx(0.5)
    values = [schedule_value("cosine", 0.0, 1.0, s, 10) for s in range(11)]
    assert values == sorted(values)
    assert schedule_value("linear", l0, None, 5, 10) == l0  # no end: constant
    with pytest.raises(ValueError, match="exponential"):
        schedule_value("exponential", 0.0, 1.0, 1, 10)
    with pytest.raises(ValueError, match="unknown"):
        schedule_value("step", 1.0, 2.0, 1, 10)


def test_dual_rescale_factor():
    assert dual_rescale_factor(2.0, 4.0) == 0.5
    assert dual_rescale_factor(3.0, 3.0) == 1.0
    assert dual_rescale_factor(0.0, 4.0) == 1.0
    assert dual_rescale_factor(4.0, 0.0) == 1.0


def _run(lmda: PenaltySchedule, steps: int, interval: int, u_dtype: str = "fp32"):
    """Coupled ADMM with SGD on a quadratic; records (lambda, x, z, u) after every step."""
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 10, generator=g))
    center = torch.randn(12, 10, generator=g)
    target = Target("w", w, 0.6, None, 1)
    admm = ADMM(
        torch.optim.SGD([w], lr=0.05),
        [target],
        admm_settings(
            total_steps=steps, lmda=lmda, interval=interval, projection="magnitude", u_dtype=u_dtype, first_split="step"
        ),
    )  # a dual from step 1 on, so every step has one to rescale
    x = w.detach()
    history = [(admm.lmda, x.clone(), admm._load(target, "z", x).clone(), admm._load(target, "u", x).clone())]
    for _ in range(steps):
        w.grad = w.detach() - center  # f = ||x - c||^2 / 2
        admm.step()
        history.append((admm.lmda, x.clone(), admm._load(target, "z", x).clone(), admm._load(target, "u", x).clone()))
    return target, history


@pytest.mark.parametrize("u_dtype", ["fp32", "bf16"])
def test_dual_rescale_keeps_lambda_u_invariant_under_cosine(u_dtype):
    steps, interval = 24, 5
    target, history = _run(PenaltySchedule(1e-2, 1.0, "cosine"), steps, interval, u_dtype)
    checked = 0
    for s in range(1, steps + 1):
        lmda_prev, _, _, u_prev = history[s - 1]
        lmda, x, z, u = history[s]
        assert lmda == pytest.approx(schedule_value("cosine", 1e-2, 1.0, s, steps), rel=1e-12)
        if admm_settings(total_steps=steps, interval=interval, first_split="step").splits_after(
            s
        ):  # z/u-update after s
            # z = Proj(x + u_prev), u = u_prev + x - z, then rescaled from lambda_prev to lambda
            assert torch.equal(z != 0, topk_mask(magnitude_score(x + u_prev), target.keep))
            expected_y = lmda_prev * (u_prev + x - z)
            tol = 1e-6 if u_dtype == "fp32" else 2**-7
            torch.testing.assert_close(lmda * u, expected_y, rtol=tol, atol=tol * float(expected_y.abs().max()))
        elif u_prev.abs().sum() == 0:  # before the first u-update there is no dual to rescale
            assert lmda != lmda_prev and u.abs().sum() == 0
        else:
            assert lmda != lmda_prev
            assert not torch.allclose(u, u_prev)  # u itself moved ...
            torch.testing.assert_close(lmda * u, lmda_prev * u_prev, rtol=1e-5, atol=1e-9)  # ... lambda * u did not
            checked += 1
    assert checked >= 15


def test_schedule_starting_at_zero_keeps_the_dual():
    steps, interval = 12, 4
    target, history = _run(PenaltySchedule(0.0, 1.0, "cosine"), steps, interval)
    lmda0, x0, _, _ = history[0]
    assert lmda0 == 0.0
    lmda1, x1, z1, u1 = history[1]
    assert lmda1 > 0
    # first z/u-update at lambda 0: u = x - z, and moving lambda off 0 must keep it (not multiply by 0)
    assert u1.abs().sum() > 0
    torch.testing.assert_close(u1, x1 - z1, rtol=0, atol=0)
    # from then on lambda * u is carried between updates
    lmda2, _, _, u2 = history[2]
    torch.testing.assert_close(lmda2 * u2, lmda1 * u1, rtol=1e-5, atol=1e-9)


def test_decoupled_with_explicit_rho_does_not_rescale_u_by_an_unused_lambda():
    """With ``penalty=decoupled`` and an explicit rho, lambda does not enter the x-update (the
    pull is rho (x - z + u)), so a lambda schedule must either be refused by the config or leave
    u alone; rescaling u by lambda_old / lambda_new silently shrinks the dual's pull rho * u."""
    from elsa.config import ConfigError, make_config

    values = {
        "sparsity": 0.5,
        "penalty": "decoupled",
        "rho": 0.1,
        "lmda": 1e-3,
        "lmda_final": 1.0,
        "lmda_schedule": "cosine",
        "steps": 10,
        "interval": 100,
        "first_split": "step",
        "projection": "magnitude",
        "optimizer": "sgd",
    }
    try:
        cfg = make_config(values)
    except ConfigError as err:  # refusing the combination is an acceptable fix
        assert "lmda" in str(err) and "rho" in str(err)
        return
    w = torch.nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    target = Target("w", w, 0.5, None, 1)
    admm = ADMM(torch.optim.SGD([w], lr=0.1), [target], ADMMSettings.from_config(cfg))
    w.grad = torch.ones(8, 8)
    admm.step()  # z/u-update after step 1
    u1 = admm._load(target, "u", w.detach()).clone()
    assert u1.abs().sum() > 0
    w.grad = torch.ones(8, 8)
    admm.step()  # no z/u-update, rho constant: the dual's pull rho * u must not change
    assert admm.rho == 0.1
    torch.testing.assert_close(admm._load(target, "u", w.detach()), u1)


def test_first_split_setting_chooses_when_z_and_u_first_move():
    """'step': z/u-updates after steps 1, 1+k, ... (the authors); 'interval': after k, 2k, ... (textbook)."""
    authors = admm_settings(total_steps=10, interval=4, first_split="step")
    textbook = admm_settings(total_steps=10, interval=4, first_split="interval")
    assert [s for s in range(1, 11) if authors.splits_after(s)] == [1, 5, 9]
    assert [s for s in range(1, 11) if textbook.splits_after(s)] == [4, 8]
