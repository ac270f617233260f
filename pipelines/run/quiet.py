"""Quiet third-party output that needs no action from the user (``--verbose`` shows it all).

Why: between a run's start and its summary the terminal filled with lines a user cannot act on:
torchao's "Failed to load ... .so" and "no triton" warnings, torch's pytree deprecation notes,
transformers' "Loading weights" bars, Ray's token-authentication banner, its PreemptionWatcher
error line and Ray Train's per-report lines. Quiet mode (the default) lowers those loggers to
errors in this process, and stops Ray from streaming its workers' output to the driver
(``log_to_driver``); the workers' logs stay in Ray's session directory
(``/tmp/ray/session_latest/logs``), the run's metrics reach the terminal through the progress
line (:mod:`pipelines.run.progress`), and errors reach it as exceptions.
"""

from __future__ import annotations

import logging
import os
import warnings

from elsa.model_io.quiet import IMPORT_NOISE_LOGGERS

QUIET_ENV = "ELSA_QUIET"
_LOGGERS = (
    "ray",
    "ray.train",
    "ray.tune",
    "mlflow",
    "alembic",
    *IMPORT_NOISE_LOGGERS,  # torchao's "Failed to load ... .so", torch's pytree notes (elsa.model_io.quiet)
    "transformers",
    "datasets",
    "huggingface_hub",
    "lm_eval",
    "urllib3",
)


def configure(verbose: bool) -> None:
    """Set quiet (default) or verbose mode for this process and the Ray it starts."""
    if verbose:
        os.environ.pop(QUIET_ENV, None)
        for name in IMPORT_NOISE_LOGGERS:  # a level of their own: elsa.model_io.quiet then leaves them as set
            logging.getLogger(name).setLevel(logging.WARNING)
        return
    os.environ[QUIET_ENV] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow sets its level when imported
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)


def is_quiet() -> bool:
    return os.environ.get(QUIET_ENV) == "1"


def ray_init_kwargs() -> dict:
    """Extra ``ray.init`` arguments for the current mode."""
    if not is_quiet():
        return {"log_to_driver": True}
    return {"log_to_driver": False, "logging_level": logging.ERROR}
