"""ADMM settings for the core's unit tests, built the one way the product builds them.

``ADMMSettings`` has no defaults of its own; tests start from ``PruneConfig`` with the paper's
reference form pinned (coupled penalty, no warm start, interval 32: the budget rule would
otherwise choose by the number of steps) and replace only the fields a test is about.
"""

from __future__ import annotations

import dataclasses

from elsa.config import make_config
from elsa.optim.admm import ADMMSettings

REFERENCE = {
    "model": "tiny",
    "sparsity": 0.7,
    "steps": 100,
    "penalty": "coupled",
    "init": "none",
    "interval": 32,
    "lr": 1e-3,
}


def admm_settings(**fields) -> ADMMSettings:
    return dataclasses.replace(ADMMSettings.from_config(make_config(REFERENCE)), **fields)


RESUME_STEPS = 3  # resume tests: 2N steps in one go against N, checkpoint, restore, N


def resume_config(**overrides):
    """The small run the resume tests checkpoint halfway (z/u-updates every 2 steps)."""
    fields = {
        "model": "tiny",
        "sparsity": 0.7,
        "steps": 2 * RESUME_STEPS,
        "interval": 2,
        "seqlen": 16,
        "batch_size": 2,
        "eval_interval": 1000,
        "log_interval": 1000,
        "lr_schedule": "constant",
        "lr": 6e-4,  # what the budget rule gave before it scaled lr to the weights (elsa/weight_scale.py)
    }
    return make_config({**fields, **overrides})


def resume_batches(step: int, micro: int):
    """Random token blocks, the same for a step whatever process or restart asks."""
    import torch

    from elsa import tiny

    generator = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randint(2, tiny.TINY_VOCAB_SIZE, (2, 16), generator=generator)
