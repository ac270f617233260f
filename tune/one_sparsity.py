"""One sparsity's search: its MLflow parent run, one Tune ``Tuner`` (new or restored), its outcome.

:func:`tune.runner.run_search` calls :func:`search_one` for each sparsity in turn with the
:class:`Search` they share (the request, where it runs, the space, the state record).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable

from pipelines.records import tracking
from tune import runs, state
from tune.errors import SearchError
from tune.results import SparsityOutcome, best_row, trial_rows
from tune.search import DivergenceStopper, make_scheduler, make_searcher
from tune.seed import SeedPoint, seed_points
from tune.space import SearchSpace, trial_config
from tune.starts import start_variants, variant_key, variant_label
from tune.trial import TrialContext, run_trial


@dataclass
class Search:
    """What every sparsity of one search shares."""

    request: object  # tune.runner.SearchRequest
    where: object  # tune.runner.Where
    space: SearchSpace
    root: str  # the search's folder: state, Tune experiments, trial storage
    uri: str  # MLflow
    grace: int  # ASHA's grace period, in steps
    concurrency: int  # trials at once
    saved: dict  # the state record (tune.state), rewritten as runs open
    echo: Callable[[str], None]
    callbacks: list  # extra Tune callbacks


def sparsity_key(sparsity: float) -> str:
    return f"sparsity-{sparsity:g}"


def search_one(search: Search, base: dict, sparsity: float, entry: dict) -> SparsityOutcome:
    """Search ``sparsity`` (or read its finished results); ``entry`` is its part of the state record."""
    from ray import tune as ray_tune

    request, key = search.request, sparsity_key(sparsity)
    experiment_path = state.join(search.root, key)
    if entry.get("status") == "done" and entry.get("parent_run_id"):
        search.echo(f"{key}: already finished (MLflow parent run {entry['parent_run_id']}); reading its results")
        grid = ray_tune.ResultGrid(ray_tune.ExperimentAnalysis(experiment_path))
        seeds = _seeds(search, base, sparsity, _any_start(_start_locations(search, base, sparsity)))
        return _summarise(search, grid, base, sparsity, entry["parent_run_id"], experiment_path, seeds)
    parent = _open_parent(search, base, sparsity, entry)
    search.echo(f"{key}: MLflow parent run {parent} ({search.uri}, experiment {request.experiment!r})")
    started = time.perf_counter()
    try:
        init_locations = _shared_start(search, base, sparsity, parent)
        seeds = _seeds(search, base, sparsity, _any_start(init_locations))
        if not entry.get("seeds_logged"):  # parameters are written once; a resumed search has them
            tracking.log_params(search.uri, parent, _seed_params(seeds))
            entry["seeds_logged"] = True
            state.write(search.root, search.saved)
        for seed in seeds:
            search.echo(f"{key}: seed {seed.source}: {seed.point}")
        grid = _tuner(search, base, sparsity, parent, seeds, experiment_path, init_locations).fit()
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        runs.finish(search.uri, parent, status, {"error": f"{type(err).__name__}: {err}"})
        raise
    outcome = _summarise(search, grid, base, sparsity, parent, experiment_path, seeds)
    outcome.wall_s = time.perf_counter() - started
    if outcome.interrupted:
        runs.close_interrupted(search.uri, request.experiment, parent)
    _log_parent(search.uri, parent, outcome)
    return outcome


def _open_parent(search: Search, base: dict, sparsity: float, entry: dict) -> str:
    """The sparsity's MLflow parent run: reopened on resume, else created and recorded."""
    if entry.get("parent_run_id"):
        runs.reopen(search.uri, entry["parent_run_id"])
        return entry["parent_run_id"]
    request = search.request
    parent = runs.open_parent(
        search.uri,
        request.experiment,
        base,
        _parent_params(search),
        run_name=f"{request.name}@{sparsity:g}",
        tags={"search": request.name, "sparsity": str(sparsity)},
    )
    entry["parent_run_id"] = parent
    state.write(search.root, search.saved)
    return parent


def _start_locations(search: Search, base: dict, sparsity: float) -> dict[str, str] | None:
    """Where the sparsity's shared warm starts live, by :func:`tune.starts.variant_key` (None: the
    trials have none to share)."""
    variants = start_variants(search.space)
    cfg = trial_config(base, search.space.overrides({}, base))
    if cfg.init == "none" or variants is None:
        return None
    folder = state.join(search.root, "init", sparsity_key(sparsity))
    return {variant_key(v): state.join(folder, variant_key(v)) if v else folder for v in variants}


def _any_start(locations: dict[str, str] | None) -> str | None:
    """One of the starts (they share the dense model, hence its weight scale), or None."""
    return next(iter(locations.values())) if locations else None


def _shared_start(search: Search, base: dict, sparsity: float, parent: str) -> dict[str, str] | None:
    """The warm starts the trials begin from, each computed once per sparsity (None: each trial's own).

    Why: the one-shot start (SparseGPT by the budget rule) depends on none of the searched
    settings (lr, lambda, penalty, rho) but the start's own (tune/starts.py), yet computed in each
    trial it cost every trial its minutes again. Written to the search's folder; a resumed search
    reuses them.
    """
    locations = _start_locations(search, base, sparsity)
    if locations is None:  # no start (init: none) or none shared: each trial computes its own
        return None
    for variant in start_variants(search.space):
        _write_start(search, base, sparsity, parent, variant, locations[variant_key(variant)])
    return locations


def _write_start(search: Search, base: dict, sparsity: float, parent: str, variant: dict, location: str) -> None:
    from elsa.weight_scale import WEIGHT_SCALE_FILE
    from pipelines.run.oneshot import run_one_shot
    from pipelines.run.progress import BlockLine, ProgressPrinter
    from pipelines.run.storage import holds

    if holds(location, "config.json") and holds(location, WEIGHT_SCALE_FILE):
        return  # complete: the weight scale is uploaded with the model (an upload cut short lacks one)
    cfg = trial_config(base, search.space.overrides(variant, base))
    request = search.request
    name = " ".join(filter(None, (sparsity_key(sparsity), variant_key(variant))))
    search.echo(f"{name}: {cfg.init} start for every trial: one-shot pruning of {cfg.model}, block by block")
    started = time.perf_counter()  # before any trial: the machine's cores are the one-shot pass's
    with ProgressPrinter(BlockLine(f"{name}: {cfg.init} start")) as printer:  # minutes: never silent
        run_one_shot(
            {**cfg.model_dump(mode="json"), "method": cfg.init},
            location,
            None,
            address=search.where.address,
            gpu=request.gpu,
            cpus=None,
            progress=printer.sink(),
        )
    seconds = time.perf_counter() - started
    tracking.log_metrics(search.uri, parent, {f"init_s{variant_label(variant)}": seconds})
    search.echo(f"{name}: {cfg.init} start for every trial written in {seconds:.0f} s ({location})")


def _trial_context(
    search: Search, base: dict, sparsity: float, parent: str, init_locations: dict[str, str] | None
) -> TrialContext:
    from pipelines.run.ray_session import local_cores_per_task

    request = search.request
    return TrialContext(
        base=base,
        space=search.space,
        search_name=request.name,
        tracking_uri=search.uri,
        experiment=request.experiment,
        parent_run_id=parent,
        train_storage=state.join(search.root, "train", sparsity_key(sparsity)),
        workers=request.workers_per_trial,
        use_gpu=request.gpu,
        cpus_per_worker=request.cpus_per_worker,
        export=request.export,
        train_env={k: v for k, v in os.environ.items() if k.startswith("RAY_TRAIN_")},
        threads_per_worker=local_cores_per_task(
            search.where.address, request.gpu, search.concurrency * request.workers_per_trial
        ),
        init_locations=init_locations,
        user={**request.config, "model": request.model, "sparsity": sparsity},
    )


def _tuner(
    search: Search,
    base: dict,
    sparsity: float,
    parent: str,
    seeds: list[SeedPoint],
    experiment_path: str,
    init_locations: dict[str, str] | None,
):
    """A new Tuner for the sparsity, or the interrupted one restored (resume only)."""
    from ray import tune as ray_tune

    request, key = search.request, sparsity_key(sparsity)
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(run_trial, context=_trial_context(search, base, sparsity, parent, init_locations)),
        ray_tune.PlacementGroupFactory([dict(request.trial_resources)]),
    )
    if ray_tune.Tuner.can_restore(experiment_path):
        if not search.where.resume:
            raise SearchError(f"{experiment_path} holds a Tune experiment already: add --resume")
        search.echo(f"{key}: restoring the Tune experiment at {experiment_path}")
        return ray_tune.Tuner.restore(
            experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=search.where.resume_errored
        )
    callbacks = [runs.TrialRunsCallback(search.uri, request.experiment, parent, base["steps"], request.max_val_loss)]
    return ray_tune.Tuner(
        trainable,
        param_space=search.space.param_space(),
        tune_config=ray_tune.TuneConfig(
            search_alg=make_searcher(request.search, [s.point for s in seeds], request.trials, request.search_seed),
            scheduler=make_scheduler(request.scheduler, base["steps"], search.grace, request.reduction_factor),
            num_samples=request.trials,
            max_concurrent_trials=search.concurrency,
            # A stopped trial's actor must die: only then do its Ray Train controller and
            # workers (owned by that actor) die with it. A reused actor would keep the
            # stopped trainer running, and holding its CPUs, in the background.
            reuse_actors=False,
        ),
        run_config=ray_tune.RunConfig(
            name=key,
            storage_path=search.root,
            stop=DivergenceStopper(request.max_val_loss),
            callbacks=[*callbacks, *search.callbacks],
            # a trial that raised (its node lost, a worker killed) starts again, its run reopened
            failure_config=ray_tune.FailureConfig(max_failures=search.where.trial_retries),
        ),
    )


def _seeds(search: Search, base: dict, sparsity: float, init_location: str | None) -> list[SeedPoint]:
    """The points evaluated first (tune/seed.py); the rule's lr follows the dense model's weight
    scale, saved beside the shared start."""
    from elsa.weight_scale import WEIGHT_SCALE_FILE, parse_weight_scale
    from pipelines.run.storage import read_text

    text = read_text(init_location, WEIGHT_SCALE_FILE) if init_location else None
    median_rms = parse_weight_scale(text) if text else None
    return seed_points(search.space, base, search.request.model, sparsity, median_rms)


def _seed_params(seeds: list[SeedPoint]) -> dict:
    """``seed.<kind>.<field>`` and ``seed.<kind>.source`` of every seed point."""
    params = {}
    for seed in seeds:
        params.update({f"seed.{seed.kind}.{k}": v for k, v in seed.point.items()})
        params[f"seed.{seed.kind}.source"] = seed.source
    return params


def _parent_params(search: Search) -> dict:
    """The parent run's parameters beyond the shared config: the space and the settings (the seed
    points follow once the shared start has given the rule's lr)."""
    request = search.request
    params = {f"space.{k}": v for k, v in search.space.describe().items()}
    params.update(
        {
            "search.algorithm": request.search,
            "search.scheduler": request.scheduler,
            "search.trials": request.trials,
            "search.grace_period": search.grace,
            "search.reduction_factor": request.reduction_factor,
            "search.max_concurrent": search.concurrency,
            "search.trial_resources": request.trial_resources,
            "search.workers_per_trial": request.workers_per_trial,
            "search.cpus_per_worker": request.cpus_per_worker,
            "search.max_val_loss": request.max_val_loss,
            "search.seed": request.search_seed,
            "search.space_file": request.space or "default",
        }
    )
    return params


def _summarise(search: Search, grid, base, sparsity, parent, experiment_path, seeds) -> SparsityOutcome:
    request = search.request
    rows = trial_rows(grid, base["steps"], request.max_val_loss, {s.kind: s.point for s in seeds})
    children = {
        run.data.tags.get("trial_id"): run.info.run_id for run in runs.children(search.uri, request.experiment, parent)
    }
    for row in rows:
        row.mlflow_run_id = children.get(row.trial_id)
    finished = grid.num_terminated + grid.num_errors
    outcome = SparsityOutcome(
        sparsity,
        parent,
        experiment_path,
        rows,
        best_row(rows),
        [r for r in rows if r.is_seed],
        {s.kind: s.source for s in seeds},
    )
    outcome.interrupted = finished < request.trials
    return outcome


def _log_parent(uri: str, parent: str, outcome: SparsityOutcome) -> None:
    metrics = {
        "trials_completed": outcome.count("completed"),
        "trials_stopped_early": outcome.count("stopped_early"),
        "trials_diverged": outcome.count("nonfinite_loss") + outcome.count("exploded_loss"),
        "trials_failed": outcome.count("error"),
        "search_wall_s": outcome.wall_s,
    }
    if outcome.best is not None:
        metrics["best_val_loss_projected"] = outcome.best.val_loss_projected
    for row in outcome.seeds:
        metrics[f"seed_{row.seed}_val_loss_projected"] = row.val_loss_projected
    tracking.log_metrics(uri, parent, {k: v for k, v in metrics.items() if v is not None and math.isfinite(float(v))})
    tags = {f"seed_{kind}_source": source for kind, source in outcome.seed_sources.items()}
    if outcome.best is not None:
        tags.update(best_trial_id=outcome.best.trial_id, best_run_id=outcome.best.mlflow_run_id or "")
    if outcome.interrupted:
        runs.finish(uri, parent, "KILLED", {**tags, "interrupted": "true"})
    else:
        runs.finish(uri, parent, "FINISHED", tags)
