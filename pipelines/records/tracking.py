"""MLflow: where every stage of a run reports, through MLflow's own client.

The embedded default needs no server: a sqlite store ``mlflow.db`` in the working directory
(MLflow 3's file store refuses writes) with artifacts beside it under ``mlruns/``. A real server
is one flag away (``--tracking-uri http://127.0.0.1:5000`` or ``MLFLOW_TRACKING_URI``); it is
checked for reachability before any work starts, so a typo costs seconds, not a pruning run.
"""

from __future__ import annotations

import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from pipelines.records.redact import redact

DEFAULT_EXPERIMENT = "elsa"
_KEY_REFUSED = re.compile(r"[^\w.\- :/]")  # what MLflow refuses in a param or metric key


class TrackingError(RuntimeError):
    """MLflow cannot be used as configured; the message says what to change."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The URI to use: the argument, else MLFLOW_TRACKING_URI, else a local sqlite store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail early and clearly when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as err:
        problem = redact(str(getattr(err, "reason", err)))
    raise TrackingError(
        f"MLflow tracking server {redact(uri)} is unreachable ({problem}): start it "
        f"(mlflow server --host 127.0.0.1 --port PORT ...) or drop --tracking-uri to use the local store"
    )


def _artifact_root(uri: str) -> str | None:
    """Local stores keep artifacts beside the database, not in the current directory."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()
    return None


def client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """Get or create the experiment ``name``."""
    mlflow_client = client(uri)
    existing = mlflow_client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=_artifact_root(uri))


def git_commit() -> str:
    """The code's git commit (``unknown`` outside a checkout)."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_run(
    uri: str,
    experiment: str,
    cfg_dict: dict,
    run_name: str | None = None,
    tags: dict | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Open a run with every config field as a parameter; returns the run id."""
    mlflow_client = client(uri)
    all_tags = {
        "model": str(cfg_dict.get("model")),
        "method": str(cfg_dict.get("method")),
        "sparsity": str(cfg_dict.get("sparsity")),
        "pattern": str(cfg_dict.get("pattern")),
        "penalty": str(cfg_dict.get("penalty")),
        "git_commit": git_commit(),
        **(tags or {}),
    }
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags = {mlflow_key(k): v for k, v in all_tags.items()}
    run = mlflow_client.create_run(experiment_id(uri, experiment), run_name=run_name, tags=all_tags)
    log_params(uri, run.info.run_id, cfg_dict)
    return run.info.run_id


def mlflow_key(name: str) -> str:
    """``name`` with each character MLflow refuses in a key spelled ``_``.

    Why: MLflow rejects a whole batch for one such key, and every other value of the call is lost
    with it; a searched value can carry one (the seed kind ``rule/loss:ntp+kd`` has a ``+``).
    """
    return _KEY_REFUSED.sub("_", name)


def log_params(uri: str, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(mlflow_key(k), _param_text(v)) for k, v in sorted(params.items())]
    client(uri).log_batch(run_id, params=items)


def _param_text(value) -> str:
    text = redact(str(value))
    return text if len(text) <= 6000 else text[:5997] + "..."


def log_metrics(uri: str, run_id: str, metrics: dict, step: int | None = None) -> None:
    """Log numeric metrics (non-numbers are skipped) in one batch."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(mlflow_key(key), float(value), now, step or 0)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    if items:
        client(uri).log_batch(run_id, metrics=items)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


class RunLogger:
    """Step metrics of one run, bound to its id (picklable: it travels to Ray workers)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id

    def __call__(self, metrics: dict, step: int) -> None:
        log_metrics(self.uri, self.run_id, metrics, step)
