"""Search algorithm, early-stopping scheduler and divergence stopper of a search.

Why these choices:
* Optuna's TPE (the default) learns from finished trials, so a small budget of trials goes to the
  promising region; ``hyperopt`` (if installed) is the other TPE; ``random`` is the baseline.
  All start from the seed points (tune/seed.py: the budget rule's setting, then Table 5's).
* ASHA stops trials whose *projected* validation loss (held-out calibration text, never an
  evaluation set) is worse than the better ``1/reduction_factor`` of trials at the same step.
  Its time axis is the optimiser step (reported with every evaluation), so ``grace_period`` is in
  steps and does not depend on how often a trial reports.
* A diverged trial (NaN/inf loss, or a loss beyond ``max_val_loss``) is stopped at once by
  :class:`DivergenceStopper` rather than left to burn its budget.
"""

from __future__ import annotations

import math

from ray import tune as ray_tune

METRIC = "val_loss_projected"
MODE = "min"
TIME_ATTR = "step"
SEARCHERS = ("optuna", "hyperopt", "random")
SCHEDULERS = ("asha", "none")
# Reported instead of a NaN/inf validation loss: searchers and ASHA compare numbers, and NaN
# compares false with everything (ASHA would never stop such a trial, Optuna would drop it).
NONFINITE_LOSS = 1.0e6
# Cross-entropy far above ln(vocabulary) (10.8 for SmolLM2's 49k tokens) is worse than guessing
# uniformly: the trial has diverged, whatever it might still do.
DEFAULT_MAX_VAL_LOSS = 50.0
TRIAL_RETRIES = 1  # a trial that raised (its node lost) starts again once before it counts as failed


def make_searcher(kind: str, seed_points: list[dict], trials: int, seed: int):
    """The search algorithm; the seed points run first, in order."""
    if kind == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        # TPE's random start-up: enough to see the space, few enough to learn within the budget.
        startup = max(2, min(10, trials // 4))
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
        return OptunaSearch(metric=METRIC, mode=MODE, points_to_evaluate=seed_points or None, sampler=sampler)
    if kind == "hyperopt":
        try:
            from ray.tune.search.hyperopt import HyperOptSearch
            import hyperopt  # noqa: F401
        except ImportError:
            raise ValueError(
                "--search hyperopt needs the hyperopt package: pip install hyperopt (or use --search optuna)"
            ) from None
        return HyperOptSearch(metric=METRIC, mode=MODE, points_to_evaluate=seed_points or None, random_state_seed=seed)
    if kind == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(points_to_evaluate=list(seed_points), random_state=seed)
    raise ValueError(f"--search {kind!r} is unknown; choose one of {', '.join(SEARCHERS)}")


def make_scheduler(kind: str, max_t: int, grace_period: int, reduction_factor: float):
    """ASHA on the projected validation loss, or FIFO (every trial runs its whole budget)."""
    if kind == "none":
        return ray_tune.schedulers.FIFOScheduler()
    if kind != "asha":
        raise ValueError(f"--scheduler {kind!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
    if grace_period < 1 or grace_period > max_t:
        raise ValueError(
            f"--grace-period {grace_period} must be between 1 and --steps {max_t} (it counts optimiser steps)"
        )
    if reduction_factor <= 1:
        raise ValueError(f"--reduction-factor {reduction_factor} must be > 1")
    # stop_last_trials=False: a trial that reached the last step finishes normally (its final
    # projection and report run) instead of being cut off by the rung at max_t.
    return ray_tune.schedulers.ASHAScheduler(
        time_attr=TIME_ATTR,
        metric=METRIC,
        mode=MODE,
        max_t=max_t,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        stop_last_trials=False,
    )


def diverged(result: dict, max_val_loss: float) -> str | None:
    """``"nonfinite_loss"`` / ``"exploded_loss"`` when a result shows divergence, else None."""
    if result.get("nonfinite_loss"):
        return "nonfinite_loss"
    value = result.get(METRIC)
    if value is None:
        return None
    if not math.isfinite(value) or value >= NONFINITE_LOSS:
        return "nonfinite_loss"
    if value > max_val_loss:
        return "exploded_loss"
    return None


class DivergenceStopper(ray_tune.Stopper):
    """Stop a trial as soon as its loss is NaN/inf or exceeds ``max_val_loss``; never the search."""

    def __init__(self, max_val_loss: float = DEFAULT_MAX_VAL_LOSS):
        self.max_val_loss = max_val_loss

    def __call__(self, trial_id: str, result: dict) -> bool:
        return diverged(result, self.max_val_loss) is not None

    def stop_all(self) -> bool:
        return False
