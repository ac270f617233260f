"""The ADMM optimiser on problems whose answer is known independently.

* Sparse least squares with a k-sparse truth: at an ADMM fixed point x = z, u vanishes on the
  support and grad f vanishes there, so x is the least-squares fit restricted to the true support
  (the "oracle" solution, computed here with lstsq in float64).
* The decoupled penalty step is the closed-form proximal step x - rho (x - z + u) after the base
  step, independent of the loss scale; the coupled one is not.
"""

from __future__ import annotations

import pytest
import torch

from core_settings import admm_settings
from elsa.optim.admm import ADMM, PenaltySchedule
from elsa.config import ConfigError, PruneConfig, make_config
from elsa.targets import Target

N, D, K = 200, 50, 5


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(N, D, generator=g, dtype=torch.float64)
    support = torch.randperm(D, generator=g)[:K].sort().values
    x_star = torch.zeros(D, dtype=torch.float64)
    signs = torch.where(torch.rand(K, generator=g) < 0.5, -1.0, 1.0).double()
    x_star[support] = (1.0 + torch.rand(K, generator=g, dtype=torch.float64)) * signs
    b = A @ x_star + 0.05 * torch.randn(N, generator=g, dtype=torch.float64)
    oracle = torch.zeros(D, dtype=torch.float64)
    oracle[support] = torch.linalg.lstsq(A[:, support], b.unsqueeze(1)).solution.squeeze(1)
    # the oracle differs measurably from x* (noise), so converging to it is a sharper check
    assert (oracle - x_star).norm() / x_star.norm() > 1e-3
    return A, b, x_star, oracle, support


CASES = {
    "coupled-adam-magnitude": dict(
        penalty="coupled", base="adam", projection="magnitude", steps=1200, lr=3e-2, lmda=1.0, rho=None
    ),
    "coupled-adam-fisher": dict(
        penalty="coupled", base="adam", projection="fisher", steps=1200, lr=3e-2, lmda=1.0, rho=None
    ),
    "coupled-adam-loss-fisher": dict(
        penalty="coupled",
        base="adam",
        projection="fisher",
        steps=1200,
        lr=3e-2,
        lmda=1.0,
        rho=None,
        fisher_source="loss",
    ),
    "decoupled-sgd-derived-rho": dict(
        penalty="decoupled", base="sgd", projection="magnitude", steps=300, lr=0.5, lmda=1.0, rho=None
    ),
    "decoupled-sgd-rho": dict(
        penalty="decoupled", base="sgd", projection="magnitude", steps=300, lr=0.5, lmda=0.0, rho=0.3
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sparse_least_squares_recovers_support_and_optimum(problem, case):
    spec = CASES[case]
    A64, b64, x_star, oracle, support = problem
    A, b = A64.float(), b64.float()
    x = torch.nn.Parameter(torch.empty(1, D).normal_(0, 0.1, generator=torch.Generator().manual_seed(1)))
    target = Target("x", x, 1 - K / D, None, 1)
    assert target.keep == K
    steps = spec["steps"]
    base = torch.optim.Adam([x], lr=spec["lr"]) if spec["base"] == "adam" else torch.optim.SGD([x], lr=spec["lr"])
    settings = admm_settings(
        total_steps=steps,
        lmda=PenaltySchedule(spec["lmda"]),
        interval=16,
        projection=spec["projection"],
        penalty=spec["penalty"],
        rho=PenaltySchedule(spec["rho"]) if spec["rho"] else None,
        fisher_source=spec.get("fisher_source", "adam"),
        beta2=0.999,
    )
    admm = ADMM(base, [target], settings)
    initial_support = set(admm._load(target, "z", x.detach()).nonzero()[:, 1].tolist())
    assert initial_support != set(support.tolist())  # it has to move away from the initial z
    sched = (
        torch.optim.lr_scheduler.LambdaLR(admm, lambda s: max(0.0, 1 - s / steps)) if spec["base"] == "adam" else None
    )
    for _ in range(steps):
        residual = A @ x[0] - b
        x.grad = (A.t() @ residual / N).unsqueeze(0)  # gradient of ||Ax - b||^2 / (2N)
        admm.step()
        if sched is not None:
            sched.step()
    admm.final_projection()
    result = x.detach()[0].double()
    assert set(result.nonzero()[:, 0].tolist()) == set(support.tolist())
    z = admm._load(target, "z", x.detach())[0].double()
    assert set(z.nonzero()[:, 0].tolist()) == set(support.tolist())
    assert (result - oracle).norm() / oracle.norm() < 2e-4
    assert (result - x_star).norm() / x_star.norm() < 1e-2
    assert admm.last_metrics["primal_residual"] < 1e-3 and admm.last_metrics["mask_change"] == 0.0


# ---------------------------------------------------------------- decoupled penalty (issue 9)


def _setup(base_kind: str, penalty: str, rho: float | None, lmda: float, lr: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(8, 8, generator=g))
    bias = torch.nn.Parameter(torch.randn(8, generator=g))  # not a target: base step only
    target = Target("w", w, 0.5, None, 1)
    opt = torch.optim.SGD([w, bias], lr=lr) if base_kind == "sgd" else torch.optim.Adam([w, bias], lr=lr)
    settings = admm_settings(
        total_steps=100,
        lmda=PenaltySchedule(lmda),
        interval=100,
        projection="magnitude",
        penalty=penalty,
        rho=PenaltySchedule(rho) if rho is not None else None,
        first_split="step",
    )  # a z/u-update after step 1: a non-zero dual to test with
    return w, bias, target, ADMM(opt, [target], settings), g


@pytest.mark.parametrize("base_kind", ["sgd", "adam"])
@pytest.mark.parametrize("rho", [0.2, None])
def test_decoupled_step_is_closed_form_proximal_step(base_kind, rho):
    lr, lmda = 0.1, 2.0
    w, bias, target, admm, g = _setup(base_kind, "decoupled", rho, lmda, lr)
    ref_w = torch.nn.Parameter(w.detach().clone())
    ref_b = torch.nn.Parameter(bias.detach().clone())
    ref_opt = torch.optim.SGD([ref_w, ref_b], lr=lr) if base_kind == "sgd" else torch.optim.Adam([ref_w, ref_b], lr=lr)
    for step in range(3):
        if step == 2:  # the derived rho follows the group's current lr
            for group in admm.param_groups + ref_opt.param_groups:
                group["lr"] = 0.05
        gw, gb = torch.randn(8, 8, generator=g), torch.randn(8, generator=g)
        x_before = w.detach().clone()
        z = admm._load(target, "z", x_before).clone()
        u = admm._load(target, "u", x_before).clone()
        # the plain base step from the same point, on an independent optimiser
        with torch.no_grad():
            ref_w.copy_(x_before)
            ref_b.copy_(bias)
        ref_w.grad, ref_b.grad = gw.clone(), gb.clone()
        ref_opt.step()
        x_base = ref_w.detach().clone()
        w.grad, bias.grad = gw.clone(), gb.clone()
        admm.step()
        eta = admm.param_groups[0]["lr"]
        r = rho if rho is not None else eta * lmda / (1 + eta * lmda)
        expected = x_base - r * (x_base - z + u)
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=2e-6)
        torch.testing.assert_close(bias.detach(), ref_b.detach(), rtol=0, atol=0)
        if step == 0:  # the z/u-update ran after step 1: u is non-trivial from now on
            assert admm._load(target, "u", w.detach()).abs().sum() > 0


def _one_step_with_loss_scale(penalty: str, scale: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    lr, lmda, rho = 1e-2, 1.0, 0.1
    w, _, target, admm, _ = _setup("adam", penalty, rho if penalty == "decoupled" else None, lmda, lr, seed=3)
    x0 = w.detach().clone()
    pruned = admm._load(target, "z", x0) == 0  # z0 = magnitude projection, u0 = 0
    # linear loss scale * <c, x>; on pruned weights c opposes the coupled pull at scale 1 only
    c = torch.where(pruned, -0.5 * lmda * x0, torch.ones_like(x0))
    loss = scale * (c * w).sum()
    loss.backward()
    admm.step()
    return x0, w.detach().clone(), pruned


def test_loss_scale_leaves_decoupled_pull_unchanged_but_changes_coupled():
    lr, rho = 1e-2, 0.1
    x0, dec1, pruned = _one_step_with_loss_scale("decoupled", 1.0)
    _, dec1000, _ = _one_step_with_loss_scale("decoupled", 1000.0)
    _, cou1, _ = _one_step_with_loss_scale("coupled", 1.0)
    _, cou1000, _ = _one_step_with_loss_scale("coupled", 1000.0)
    assert pruned.sum() == 32
    # decoupled: Adam's first step is lr * sign(grad) at any scale, then the same proximal pull
    torch.testing.assert_close(dec1[pruned], dec1000[pruned], rtol=0, atol=1e-6)
    expected = (1 - rho) * (x0 + lr * torch.sign(x0))  # grad sign is -sign(x0) on pruned entries
    torch.testing.assert_close(dec1[pruned], expected[pruned], rtol=0, atol=1e-6)
    # coupled: at scale 1 the penalty wins (towards 0), at 1000 the loss wins (away from 0)
    torch.testing.assert_close(cou1[pruned], (x0 - lr * torch.sign(x0))[pruned], rtol=0, atol=1e-6)
    torch.testing.assert_close(cou1000[pruned], (x0 + lr * torch.sign(x0))[pruned], rtol=0, atol=1e-6)
    assert (cou1[pruned] - cou1000[pruned]).abs().min() > 1.9 * lr


@pytest.mark.parametrize("field", ["rho", "rho_final"])
@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5])
def test_rho_outside_unit_interval_is_refused(field, value):
    extra = {"rho": 0.1, "rho_schedule": "linear"} if field == "rho_final" else {}
    with pytest.raises(ConfigError, match="rho") as err:
        make_config({"sparsity": 0.7, "penalty": "decoupled", **extra, field: value})
    assert field in str(err.value)
    with pytest.raises(ValueError, match="rho"):
        PruneConfig(sparsity=0.7, penalty="decoupled", **{field: value})
    make_config({"sparsity": 0.7, "penalty": "decoupled", "rho": 0.5})  # inside: accepted


# ------------------------------------------------- the fisher projection's v in coupled mode


def _coupled_fisher_run(source: str, steps: int = 6, interval: int = 6):
    """Coupled ADMM on a fixed quadratic whose loss gradients are tiny next to the penalty's.

    Returns the ADMM, its target, the loss gradients it saw, and the mask (z != 0) of each
    z/u-update, z0's (magnitude) first.
    """
    g = torch.Generator().manual_seed(7)
    w = torch.nn.Parameter(torch.randn(16, 32, generator=g))
    curvature = torch.rand(16, 32, generator=g) + 0.5  # loss 1e-4 * sum(c (w - w0)^2 + c w)
    anchor = w.detach().clone()
    target = Target("w", w, 0.75, None, 1)
    settings = admm_settings(
        total_steps=steps,
        lmda=PenaltySchedule(1.0),
        interval=interval,
        projection="fisher",
        penalty="coupled",
        fisher_source=source,
        beta2=0.95,
    )
    admm = ADMM(torch.optim.Adam([w], lr=1e-2, betas=(0.9, 0.95)), [target], settings)
    grads, masks = [], [admm._load(target, "z", w.detach()) != 0]
    for _ in range(steps):
        w.grad = 1e-4 * curvature * (2 * (w.detach() - anchor) + 1)
        grads.append(w.grad.clone())
        admm.step()
        if admm.admm_step % interval == 0:
            masks.append(admm._load(target, "z", w.detach()) != 0)
    return admm, target, grads, masks


def test_loss_fisher_is_the_ema_of_squared_loss_gradients():
    admm, target, grads, _ = _coupled_fisher_run("loss", steps=5, interval=100)
    beta2, f = 0.95, torch.zeros_like(grads[0])
    for grad in grads:  # the gradients as the loss gave them, before the penalty was added
        f = beta2 * f + (1 - beta2) * grad.pow(2)
    torch.testing.assert_close(admm._fisher(target), f / (1 - beta2**5), rtol=1e-6, atol=0)
    adam_v = admm.base.state[target.param]["exp_avg_sq"] / (1 - beta2**5)
    assert (adam_v - admm._fisher(target)).abs().max() > 1e3 * f.max()  # Adam's v holds the penalty


def test_first_coupled_projection_keeps_what_the_loss_says_not_what_z0_pruned():
    """With Adam's v, the entries z0 pruned carry lambda^2 x^2 in v and win the first fisher
    projection: the kept set becomes the complement of magnitude's (residual near 1). With the
    loss's own v, the kept set is the brute-force top-k of v_loss * (x + u)^2."""
    _, _, _, (z0, adam_first) = _coupled_fisher_run("adam")
    assert not (adam_first & z0).any()  # not one of z0's entries kept: the whole kept set swapped
    admm, target, grads, (z0, loss_first) = _coupled_fisher_run("loss")
    beta2, f = 0.95, torch.zeros_like(grads[0])
    for grad in grads:
        f = beta2 * f + (1 - beta2) * grad.pow(2)
    score = f * target.param.detach().pow(2)  # the first update projects x + u with u = 0
    expected = torch.zeros(score.numel(), dtype=torch.bool)
    expected[score.flatten().topk(target.keep).indices] = True
    assert torch.equal(loss_first.flatten(), expected)
    assert (loss_first & z0).sum() > 0.7 * target.keep  # mostly the large weights, as magnitude's
