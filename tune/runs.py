"""MLflow runs of a search: one parent per (search, sparsity), one child per trial.

Why a Tune callback as well as the trial itself: a trial that ASHA or the divergence stopper ends
is killed in the middle of its work, so it cannot close its own run. The callback, which runs in
the process that drives the search, closes whatever the trial left open: KILLED with tag
``stopped_early`` for an early stop, FAILED with ``nonfinite_loss`` / ``exploded_loss`` for a
diverged trial, FAILED with the error for a crash. Trials that end on their own close their run
themselves (FINISHED, or FAILED with ``nonfinite_loss`` when the worker raised
``NonFiniteLossError``). Children are found by tags (``search_parent``, ``trial_id``), so a
restarted trial (after a resume) keeps logging to the run it started.
"""
from __future__ import annotations

import logging

from ray import tune as ray_tune

from pipelines import tracking
from tune.search import diverged

log = logging.getLogger(__name__)

PARENT_TAG = "search_parent"


def open_parent(uri: str, experiment: str, params: dict, run_name: str, tags: dict) -> str:
    """The search's parent run (params: the seed config and the space, flattened by the caller)."""
    return tracking.start_run(uri, experiment, params, run_name=run_name, tags={"elsa_search": "true", **tags})


def reopen(uri: str, run_id: str) -> None:
    """Mark a run RUNNING again (a resumed search, a restarted trial)."""
    tracking.client(uri).update_run(run_id, status="RUNNING")


def find_child(uri: str, experiment: str, parent_run_id: str, trial_id: str):
    """The child run of ``trial_id`` under ``parent_run_id``, or None."""
    mlflow_client = tracking.client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = mlflow_client.search_runs(
        [found.experiment_id], filter_string=f"tags.{PARENT_TAG} = '{parent_run_id}' and tags.trial_id = '{trial_id}'", max_results=1
    )
    return runs[0] if runs else None


def children(uri: str, experiment: str, parent_run_id: str) -> list:
    """All child runs of a parent (every trial of one search)."""
    mlflow_client = tracking.client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return list(mlflow_client.search_runs([found.experiment_id], filter_string=f"tags.{PARENT_TAG} = '{parent_run_id}'", max_results=10000))


def open_child(uri: str, experiment: str, parent_run_id: str, trial_id: str, cfg_dict: dict, sample: dict, tags: dict) -> str:
    """The trial's run: created on its first start, reopened (``attempts`` + 1) on a restart."""
    existing = find_child(uri, experiment, parent_run_id, trial_id)
    mlflow_client = tracking.client(uri)
    if existing is not None:
        run_id = existing.info.run_id
        attempts = int(existing.data.tags.get("attempts", "1")) + 1
        reopen(uri, run_id)
        mlflow_client.set_tag(run_id, "attempts", str(attempts))
        return run_id
    params = {**cfg_dict, **{f"search.{k}": v for k, v in sample.items()}}
    all_tags = {PARENT_TAG: parent_run_id, "trial_id": trial_id, "attempts": "1", **tags}
    return tracking.start_run(uri, experiment, params, run_name=f"trial-{trial_id}", tags=all_tags, parent_run_id=parent_run_id)


def finish(uri: str, run_id: str, status: str, tags: dict | None = None) -> None:
    mlflow_client = tracking.client(uri)
    for key, value in (tags or {}).items():
        mlflow_client.set_tag(run_id, key, str(value)[:5000])
    tracking.end_run(uri, run_id, status)


class TrialRunsCallback(ray_tune.Callback):
    """Closes the child run of every trial the trial itself could not close (see module doc)."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str, steps: int, max_val_loss: float):
        self.uri, self.experiment, self.parent_run_id = uri, experiment, parent_run_id
        self.steps, self.max_val_loss = steps, max_val_loss

    def _open_child(self, trial):
        run = find_child(self.uri, self.experiment, self.parent_run_id, trial.trial_id)
        return run if run is not None and run.info.status == "RUNNING" else None

    def on_trial_complete(self, iteration, trials, trial, **info):
        try:
            run = self._open_child(trial)
            if run is None:
                return
            last = trial.last_result or {}
            step = int(last.get("step", 0) or 0)
            reason = diverged(last, self.max_val_loss)
            if reason:
                finish(self.uri, run.info.run_id, "FAILED", {reason: "true", "stopped_at_step": step, "stopped_early": str(step < self.steps).lower()})
            elif step < self.steps:
                finish(self.uri, run.info.run_id, "KILLED", {"stopped_early": "true", "stopped_at_step": step})
            else:  # reached the last step; stopped while finishing (e.g. ASHA's last rung)
                finish(self.uri, run.info.run_id, "FINISHED", {"stopped_early": "false"})
        except Exception as err:  # tracking must never take the search down
            log.warning("could not close the MLflow run of trial %s: %s", trial.trial_id, err)

    def on_trial_error(self, iteration, trials, trial, **info):
        try:
            run = self._open_child(trial)
            if run is not None:
                error = getattr(trial, "error_file", None) or "trial raised"
                finish(self.uri, run.info.run_id, "FAILED", {"error": error})
        except Exception as err:
            log.warning("could not close the MLflow run of trial %s: %s", trial.trial_id, err)
