"""One trial of a search: a pruning run of the pipeline, driven from a Ray Tune function trainable.

Why a driver function rather than ``Tuner(trainer)``: in Ray Train V2 (Ray >= 2.50) passing a
trainer to Tune is deprecated; the supported pattern is a function trainable that builds the
pipeline's ``TorchTrainer`` and calls ``fit()``, with a callback forwarding the workers' reports
to Tune. The workers run :func:`pipelines.run.train_job.train_loop_per_worker` unchanged, so a trial
is exactly an ``elsa prune`` of that configuration (minus the downstream evaluation: trials are
judged on held-out calibration text only, never on the evaluation sets).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from ray.tune.integration.ray_train import TuneReportCallback

from elsa.loop import DivergedError, NonFiniteLossError
from tune import runs
from tune.search import METRIC, NONFINITE_LOSS
from tune.space import SearchSpace, trial_config
from tune.starts import trial_start_key


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one search shares (passed once through ``tune.with_parameters``)."""

    base: dict  # the user's PruneConfig (budget and fixed fields), the budget rule filled in, JSON form
    space: SearchSpace
    search_name: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    train_storage: str  # where the trials' Ray Train runs keep their state (and resume from)
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = 0.5
    export: bool = False  # keep each trial's pruned model as its Train run's last checkpoint (costly)
    train_env: dict | None = None  # RAY_TRAIN_* settings of the search's environment (see run_trial)
    threads_per_worker: int | None = None  # torch threads of each worker (None: Ray's OMP default)
    # the warm starts the trials share, written once (tune.one_sparsity), by tune.starts.variant_key
    init_locations: dict[str, str] | None = None
    # the user's own settings (model, sparsity, --config, flags) before the budget rule: each trial's
    # config is built from them and its sample, so the rule fills the rest for the sampled penalty,
    # exactly as `elsa prune` with the same flags and the trial's preset entry does
    user: dict | None = None


class SearchReportCallback(TuneReportCallback):
    """Forward the workers' evaluation reports to Tune, and only those, with finite losses.

    Tune requires the searched metric in every result, but the worker loop also reports
    checkpoints and its final summary without it; those stay Ray Train's business. A NaN/inf
    validation loss is replaced by :data:`~tune.search.NONFINITE_LOSS` and flagged, because NaN
    compares false with everything: ASHA would never stop the trial and Optuna would drop it.
    """

    def after_report(self, run_context, metrics, checkpoint):
        first = dict(metrics[0]) if metrics else {}
        if METRIC not in first:
            return
        value = first[METRIC]
        if value is None or not math.isfinite(float(value)):
            first.update({METRIC: NONFINITE_LOSS, "nonfinite_loss": 1})
        super().after_report(run_context, [first, *metrics[1:]], None)


def nonfinite_error(err: BaseException) -> str | None:
    """The NonFiniteLossError message inside a Ray Train failure, or None."""
    seen, stack = set(), [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, NonFiniteLossError):
            return str(current).strip().splitlines()[0]
        stack += [current.__cause__, current.__context__, getattr(current, "controller_failure", None)]
        stack += list((getattr(current, "worker_failures", None) or {}).values())
    text = str(err)
    for name in (DivergedError.__name__, NonFiniteLossError.__name__):  # a diverged loss is finite but exploding
        if name in text:
            after = text.split(name, 1)[1].lstrip(": ")
            return (after.splitlines() or [""])[0] or "non-finite training loss"
    return None


def train_worker(config: dict) -> None:
    """Ray Train's worker function for a trial: the pipeline's loop, plus one tag for clean-up.

    Rank 0 records its placement group on the trial's MLflow run. When Tune stops a trial, the
    trial's Train controller dies before it can remove its workers' placement group; Ray Train's
    own clean-up of that case polls the State API, which is missing when Ray runs without its
    dashboard. :class:`tune.runs.TrialRunsCallback` removes the group by this id instead, so a
    stopped trial never keeps its CPUs from the trials after it.
    """
    import ray.train
    import torch
    from ray.util import get_current_placement_group

    from pipelines.run.train_job import train_loop_per_worker

    if config.get("threads"):  # Ray would hold a 0.5-CPU worker to one thread on an idle machine
        torch.set_num_threads(int(config["threads"]))
    tracking_info = config.get("tracking")
    group = get_current_placement_group()
    if ray.train.get_context().get_world_rank() == 0 and tracking_info and group is not None:
        runs.record_placement_group(tracking_info["uri"], tracking_info["run_id"], group.id.hex())
    train_loop_per_worker(config)


def _failed_step(message: str, default: int) -> int:
    match = re.search(r"at step (\d+)", message)
    return int(match.group(1)) if match else default


def _report_diverged(uri: str, run_id: str, message: str, steps: int) -> None:
    """A diverged trial is a result, not a crash: close its run first (the report below makes
    Tune stop this trial), then tell the searcher how bad it was."""
    from ray import tune as ray_tune

    step = _failed_step(message, steps)
    runs.finish(uri, run_id, "FAILED", {"nonfinite_loss": "true", "stopped_at_step": step, "error": message})
    ray_tune.report({METRIC: NONFINITE_LOSS, "nonfinite_loss": 1, "step": step})


def run_trial(config: dict, context: TrialContext) -> None:
    """The trainable: one pruning run with the sampled ``config``, reported to Tune."""
    from ray import tune as ray_tune

    from pipelines.run.trainer import build_trainer

    # Ray Train reads its RAY_TRAIN_* settings (poll interval, timeouts) from the environment of
    # the process calling fit(): here a trial actor, which does not inherit the environment of
    # the `elsa tune` command when Ray was started elsewhere. Carry them over explicitly.
    os.environ.update(context.train_env or {})
    tune_context = ray_tune.get_context()
    trial_id = tune_context.get_trial_id()
    overrides = context.space.overrides(config, context.base)
    cfg = trial_config(context.user or context.base, overrides)
    cfg_dict = cfg.model_dump(mode="json")
    uri = context.tracking_uri
    run_id = runs.open_child(
        uri,
        context.experiment,
        context.parent_run_id,
        trial_id,
        cfg_dict,
        config,
        tags={"search": context.search_name, "trial_dir": tune_context.get_trial_dir()},
    )
    resources = {"CPU": context.cpus_per_worker} if context.cpus_per_worker else None
    loop_config = {
        "cfg": cfg_dict,
        "tracking": {"uri": uri, "run_id": run_id},
        "export": context.export,
        "threads": context.threads_per_worker,
    }
    if context.init_locations:
        loop_config["init_location"] = context.init_locations[trial_start_key(context.space, config)]
    trainer = build_trainer(
        train_worker,
        loop_config,
        workers=context.workers,
        use_gpu=context.use_gpu,
        resources_per_worker=resources,
        name=trial_id,
        storage_path=context.train_storage,
        max_failures=0,
        num_to_keep=1,
        callbacks=[SearchReportCallback()],
    )
    try:
        trainer.fit()
    except Exception as err:
        message = nonfinite_error(err)
        if message is None:
            # Left open on purpose: when Tune stops this trial it removes the trial's placement
            # group, which kills the Train controller first, so fit() raises ActorDiedError
            # here although nothing went wrong. The search's TrialRunsCallback knows which it
            # was (a stop or a real error) and closes the run accordingly.
            raise
        _report_diverged(uri, run_id, message, cfg.steps)
        return
    runs.finish(uri, run_id, "FINISHED", {"stopped_early": "false"})
