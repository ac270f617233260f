"""ELSA: extreme LLM sparsity with surrogate-free ADMM (framework-free core).

The method lives in :mod:`elsa.optim.admm` (x-, z-, u-updates), projections in
:mod:`elsa.optim.projection`, state storage (ELSA-L) in :mod:`elsa.optim.states`. This package imports
neither Ray nor MLflow.
"""

from elsa.config import ConfigError, PruneConfig, make_config
from elsa.optim.admm import ADMM, ADMMSettings, PenaltySchedule

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
