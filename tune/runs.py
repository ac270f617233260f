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
from pathlib import Path

from ray import tune as ray_tune

from pipelines.records import tracking
from tune.search import diverged

log = logging.getLogger(__name__)

PARENT_TAG = "search_parent"


# MLflow takes at most 100 parameters per logging call; PruneConfig alone has about 50.
_PARAMS_PER_CALL = 90


def _start(uri: str, experiment: str, cfg_dict: dict, extra: dict, **kwargs) -> str:
    """A run with the config as parameters (and its tags), then ``extra`` parameters in chunks."""
    run_id = tracking.start_run(uri, experiment, cfg_dict, **kwargs)
    items = sorted(extra.items())
    for start in range(0, len(items), _PARAMS_PER_CALL):
        tracking.log_params(uri, run_id, dict(items[start : start + _PARAMS_PER_CALL]))
    return run_id


def open_parent(uri: str, experiment: str, base: dict, params: dict, run_name: str, tags: dict) -> str:
    """The search's parent run: the shared config ``base``, plus ``params`` (space, seed, settings)."""
    return _start(uri, experiment, base, params, run_name=run_name, tags={"elsa_search": "true", **tags})


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
        [found.experiment_id],
        filter_string=f"tags.{PARENT_TAG} = '{parent_run_id}' and tags.trial_id = '{trial_id}'",
        max_results=1,
    )
    return runs[0] if runs else None


def children(uri: str, experiment: str, parent_run_id: str) -> list:
    """All child runs of a parent (every trial of one search)."""
    mlflow_client = tracking.client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return list(
        mlflow_client.search_runs(
            [found.experiment_id], filter_string=f"tags.{PARENT_TAG} = '{parent_run_id}'", max_results=10000
        )
    )


def open_child(
    uri: str, experiment: str, parent_run_id: str, trial_id: str, cfg_dict: dict, sample: dict, tags: dict
) -> str:
    """The trial's run: created on its first start, reopened (``attempts`` + 1) on a restart."""
    existing = find_child(uri, experiment, parent_run_id, trial_id)
    mlflow_client = tracking.client(uri)
    if existing is not None:
        run_id = existing.info.run_id
        attempts = int(existing.data.tags.get("attempts", "1")) + 1
        reopen(uri, run_id)
        mlflow_client.set_tag(run_id, "attempts", str(attempts))
        return run_id
    all_tags = {PARENT_TAG: parent_run_id, "trial_id": trial_id, "attempts": "1", **tags}
    searched = {f"search.{k}": v for k, v in sample.items()}
    return _start(
        uri, experiment, cfg_dict, searched, run_name=f"trial-{trial_id}", tags=all_tags, parent_run_id=parent_run_id
    )


def finish(uri: str, run_id: str, status: str, tags: dict | None = None) -> None:
    mlflow_client = tracking.client(uri)
    for key, value in (tags or {}).items():
        mlflow_client.set_tag(run_id, tracking.mlflow_key(key), str(value)[:5000])
    tracking.end_run(uri, run_id, status)


PLACEMENT_GROUP_TAG = "train_placement_group"


def record_placement_group(uri: str, run_id: str, group_hex: str) -> None:
    tracking.client(uri).set_tag(run_id, PLACEMENT_GROUP_TAG, group_hex)


def remove_placement_group(group_hex: str | None) -> bool:
    """Remove a trial's Ray Train placement group if it still exists; True if it was removed."""
    if not group_hex:
        return False
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table
    from ray.util.placement_group import remove_placement_group as remove

    group = PlacementGroup(PlacementGroupID(bytes.fromhex(group_hex)))
    if placement_group_table(group).get("state") in (None, "REMOVED"):
        return False
    remove(group)
    return True


def close_interrupted(uri: str, experiment: str, parent_run_id: str) -> int:
    """After an interrupted search: mark the runs of trials cut off mid-run KILLED (``interrupted``)
    and free their workers' placement groups. A resume reopens the runs of the trials it restarts."""
    closed = 0
    for run in children(uri, experiment, parent_run_id):
        if run.info.status != "RUNNING":
            continue
        try:
            remove_placement_group(run.data.tags.get(PLACEMENT_GROUP_TAG))
        except Exception as err:
            log.warning("could not remove the placement group of trial %s: %s", run.data.tags.get("trial_id"), err)
        finish(uri, run.info.run_id, "KILLED", {"interrupted": "true"})
        closed += 1
    return closed


class TrialRunsCallback(ray_tune.Callback):
    """Closes the child run of every trial the trial itself could not close (see module doc)."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str, steps: int, max_val_loss: float):
        self.uri, self.experiment, self.parent_run_id = uri, experiment, parent_run_id
        self.steps, self.max_val_loss = steps, max_val_loss

    def _open_child(self, trial):
        run = find_child(self.uri, self.experiment, self.parent_run_id, trial.trial_id)
        return run if run is not None and run.info.status == "RUNNING" else None

    def _release(self, run) -> None:
        """Free the placement group of a trial's workers if its stop left it behind."""
        try:
            if remove_placement_group(run.data.tags.get(PLACEMENT_GROUP_TAG)):
                log.info("removed the placement group left by stopped trial %s", run.data.tags.get("trial_id"))
        except Exception as err:
            log.warning("could not remove the placement group of trial %s: %s", run.data.tags.get("trial_id"), err)

    def on_trial_complete(self, iteration, trials, trial, **info):
        try:
            run = self._open_child(trial)
            if run is None:
                return
            self._release(run)
            last = trial.last_result or {}
            step = int(last.get("step", 0) or 0)
            reason = diverged(last, self.max_val_loss)
            if reason:
                finish(
                    self.uri,
                    run.info.run_id,
                    "FAILED",
                    {reason: "true", "stopped_at_step": step, "stopped_early": str(step < self.steps).lower()},
                )
            elif step < self.steps:
                finish(self.uri, run.info.run_id, "KILLED", {"stopped_early": "true", "stopped_at_step": step})
            else:  # reached the last step; stopped while finishing (e.g. ASHA's last rung)
                finish(self.uri, run.info.run_id, "FINISHED", {"stopped_early": "false"})
        except Exception as err:  # tracking must never take the search down
            log.warning("could not close the MLflow run of trial %s: %s", trial.trial_id, err)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """An attempt raised (its node lost, a worker killed) and Tune starts the trial again: the run
        keeps what the attempt logged, records why it ended, and frees the attempt's workers; the next
        attempt reopens it (``attempts`` + 1). Tune schedules that restart before it calls this, so
        the run may already be reopened: the attempt that ended is Tune's count of the trial's
        failures, not the run's tag, and the run is found whatever its status."""
        try:
            run = find_child(self.uri, self.experiment, self.parent_run_id, trial.trial_id)
            if run is not None:
                self._release(run)
                attempt = getattr(trial, "num_failures", 0) or run.data.tags.get("attempts", "1")
                mlflow_client = tracking.client(self.uri)
                mlflow_client.set_tag(run.info.run_id, f"attempt_{attempt}_error", _error_text(trial))
        except Exception as err:
            log.warning("could not record the lost attempt of trial %s: %s", trial.trial_id, err)

    def on_trial_error(self, iteration, trials, trial, **info):
        try:
            run = self._open_child(trial)
            if run is not None:
                self._release(run)
                finish(self.uri, run.info.run_id, "FAILED", {"error": _error_text(trial)})
        except Exception as err:
            log.warning("could not close the MLflow run of trial %s: %s", trial.trial_id, err)


def _error_text(trial) -> str:
    """The trial's error as Tune recorded it (its error file), shortened for a tag."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    # the traceback's last lines name the exception; keep them, they fit in a tag
    return "\n".join(lines[-8:])[-4000:] or f"trial {trial.trial_id} raised (see its error.txt)"
