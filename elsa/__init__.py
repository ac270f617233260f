"""ELSA: extreme LLM sparsity with surrogate-free ADMM (framework-free core).

The method lives in :mod:`elsa.admm` (x-, z-, u-updates), projections in
:mod:`elsa.projection`, state storage (ELSA-L) in :mod:`elsa.states`. This package imports
neither Ray nor MLflow.
"""

from elsa.admm import ADMM, ADMMSettings, PenaltySchedule
from elsa.config import ConfigError, PruneConfig, make_config

__all__ = [
    "ADMM",
    "ADMMSettings",
    "PenaltySchedule",
    "PruneConfig",
    "ConfigError",
    "make_config",
    "prune_model",
    "evaluate_perplexity",
]


def __getattr__(name):  # the API pulls in transformers: load it only when asked for
    if name in ("prune_model", "evaluate_perplexity", "PruneResult"):
        from elsa import api

        return getattr(api, name)
    raise AttributeError(name)
