"""ADMM settings for the core's unit tests, built the one way the product builds them.

``ADMMSettings`` has no defaults of its own; tests start from ``PruneConfig`` with the paper's
reference form pinned (coupled penalty, no warm start, interval 32: the budget rule would
otherwise choose by the number of steps) and replace only the fields a test is about.
"""

from __future__ import annotations

import dataclasses

from elsa.admm import ADMMSettings
from elsa.config import make_config

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
