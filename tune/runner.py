"""A whole search: for each sparsity, one Ray Tune ``Tuner`` over pruning runs, tracked in MLflow.

Why one Tuner per sparsity: the projected validation loss at 90% sparsity is naturally higher than
at 70%, so ASHA and the searcher must only ever compare trials of the same sparsity, and each
sparsity has its own Table 5 seed. The sparsities run one after another under one search name;
the state file (:mod:`tune.state`) records each one's parent run and whether it is done, so an
interrupted search resumes where it stopped: finished sparsities are skipped, an interrupted
Tuner is restored with ``Tuner.restore`` (finished trials are not rerun; trials cut off mid-run
restart, resuming from their last Ray Train checkpoint when ``checkpoint_interval`` is set).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from elsa.config import make_config
from pipelines import tracking
from pipelines.storage import run_storage
from tune import runs, state
from tune.results import SparsityOutcome, best_row, merge_entries, preset_entry, trial_rows
from tune.search import DEFAULT_MAX_VAL_LOSS, DivergenceStopper, make_scheduler, make_searcher
from tune.seed import paper_seed
from tune.space import SearchSpace, load_space, parse_space
from tune.trial import TrialContext, run_trial

DEFAULT_EXPERIMENT = "elsa-tune"
PRESET_FILE = "best_presets.yaml"


class SearchError(RuntimeError):
    """The search cannot start or resume as asked; the message says what to change."""


@dataclass
class SearchRequest:
    """Everything that defines a search (saved in its state file, so a resume repeats it exactly)."""

    model: str
    sparsities: list[float]
    trials: int = 8
    config: dict = field(default_factory=dict)  # PruneConfig fields every trial shares (the budget)
    space: str | None = None  # YAML file; None: tune/spaces/default.yaml
    search: str = "optuna"
    scheduler: str = "asha"
    grace_period: int | None = None  # steps; None: the first evaluation (eval_interval)
    reduction_factor: float = 2.0
    max_concurrent: int = 1
    trial_resources: dict = field(default_factory=lambda: {"CPU": 0.5})
    workers_per_trial: int = 1
    cpus_per_worker: float | None = 0.5
    gpu: bool = False
    max_val_loss: float = DEFAULT_MAX_VAL_LOSS
    search_seed: int = 0
    export: bool = False
    name: str | None = None
    experiment: str = DEFAULT_EXPERIMENT


@dataclass
class Where:
    """Where it runs and reports (not part of the search's identity)."""

    storage_path: str | None = None
    address: str | None = None
    tracking_uri: str | None = None
    preset_out: str | None = None
    resume: bool = False
    resume_errored: bool = False


@dataclass
class SearchReport:
    name: str
    root: str
    tracking_uri: str
    preset_file: str | None
    outcomes: list[SparsityOutcome]
    interrupted: bool
    wall_s: float


def default_name(model: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in Path(model).name.lower()).strip("-") or "model"
    return f"tune-{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def _sparsity_key(sparsity: float) -> str:
    return f"sparsity-{sparsity:g}"


def _check_request(request: SearchRequest) -> None:
    if request.trials < 1:
        raise SearchError(f"--trials {request.trials} must be >= 1")
    if not request.sparsities:
        raise SearchError("--sparsity needs at least one value, e.g. --sparsity 0.7 0.8")
    if request.max_concurrent < 1 or request.workers_per_trial < 1:
        raise SearchError("--max-concurrent and --workers-per-trial must be >= 1")
    if not request.max_val_loss > 0:
        raise SearchError(f"--max-val-loss {request.max_val_loss} must be > 0")


def _base_config(request: SearchRequest, sparsity: float) -> dict:
    """The user's config at this sparsity, validated once before any trial starts."""
    return make_config(request.config, {"model": request.model, "sparsity": sparsity}).model_dump(mode="json")


def _fit_check(request: SearchRequest, address: str | None, echo) -> int:
    """On a local Ray, refuse trials that can never start and cap concurrency to what fits.

    Each trial holds its driver's resources while its workers start; trials started beyond what
    the CPUs hold leave workers waiting on each other (Ray Train's start-up timeout repeats),
    so concurrency is capped rather than left to wait. On a cluster (``--address``) the
    autoscaler may add nodes, so nothing is checked.
    """
    import ray

    if address or os.environ.get("RAY_ADDRESS"):
        return request.max_concurrent
    total = ray.cluster_resources()
    for name, amount in request.trial_resources.items():
        if total.get(name, 0) < amount:
            raise SearchError(
                f"--trial-resources asks for {amount} {name}, but this Ray instance has {total.get(name, 0)}: lower "
                "it, or join a cluster with --address"
            )
    per_trial = request.trial_resources.get("CPU", 0) + request.workers_per_trial * (request.cpus_per_worker or 1.0)
    cpus = total.get("CPU", 0)
    if per_trial > cpus:
        raise SearchError(
            f"one trial needs {per_trial:g} CPUs (driver {request.trial_resources.get('CPU', 0):g} + "
            f"{request.workers_per_trial} x {request.cpus_per_worker or 1:g}) but Ray has {cpus:g}: lower "
            "--cpus-per-worker or --trial-resources"
        )
    fits = max(1, int(cpus // per_trial + 1e-9))
    if request.max_concurrent > fits:
        echo(
            f"note: {cpus:g} CPUs hold {fits} trial(s) of {per_trial:g} CPUs at a time; --max-concurrent "
            f"{request.max_concurrent} lowered to {fits}"
        )
        return fits
    return request.max_concurrent


def run_search(request: SearchRequest, where: Where, echo=print, extra_callbacks: list | None = None) -> SearchReport:
    """Run (or resume) a search; returns what it found. ``extra_callbacks``: more Tune callbacks."""
    from pipelines.ray_session import init_ray

    started = time.perf_counter()
    uri = tracking.resolve_tracking_uri(where.tracking_uri)
    tracking.check_reachable(uri)
    storage = run_storage(where.storage_path)
    request, space_data, saved = _open_state(request, where, storage)
    root = state.join(storage, request.name)
    space = parse_space(space_data, request.space or "default.yaml")
    _check_request(request)
    bases = {s: _base_config(request, s) for s in request.sparsities}  # every config error, before Ray
    batch = next(iter(bases.values()))["batch_size"]
    if batch % request.workers_per_trial:
        raise SearchError(
            f"--batch-size {batch} must be a multiple of --workers-per-trial {request.workers_per_trial} (each "
            "worker takes its slice of every batch)"
        )
    steps = next(iter(bases.values()))["steps"]
    eval_interval = next(iter(bases.values()))["eval_interval"]
    grace = request.grace_period or min(eval_interval, steps)
    make_scheduler(request.scheduler, steps, grace, request.reduction_factor)  # validate early

    init_ray(where.address)
    concurrency = _fit_check(request, where.address, echo)
    state.write(root, saved)  # only now: a search refused above leaves no state behind its name
    outcomes: list[SparsityOutcome] = []
    interrupted = False
    for sparsity in request.sparsities:
        key = _sparsity_key(sparsity)
        entry = saved["sparsities"].setdefault(key, {})
        outcome = _search_one(
            request,
            where,
            space,
            bases[sparsity],
            sparsity,
            entry,
            root,
            uri,
            grace,
            concurrency,
            echo,
            extra_callbacks,
            saved,
        )
        outcomes.append(outcome)
        entry.update(status="interrupted" if outcome.interrupted else "done")
        state.write(root, saved)
        if outcome.interrupted:
            interrupted = True
            echo(f"search interrupted; resume with: elsa tune --name {request.name} --storage-path {storage} --resume")
            break
    preset_file = None
    complete = [o for o in outcomes if o.best is not None and not o.interrupted]
    if complete:  # a partial search's best is not written: resume it first
        preset_file = _write_presets(request, where, space, bases, complete, root, uri)
    saved["status"] = "interrupted" if interrupted else "done"
    state.write(root, saved)
    return SearchReport(request.name, root, uri, preset_file, outcomes, interrupted, time.perf_counter() - started)


def _open_state(request: SearchRequest, where: Where, storage: str) -> tuple[SearchRequest, dict, dict]:
    """New search: its record (written by the caller once the checks pass). Resume: the request
    and space saved when the search started."""
    if where.resume:
        if not request.name:
            raise SearchError("--resume needs --name (and the --storage-path the search used)")
        saved = state.read(state.join(storage, request.name))
        if saved is None:
            raise SearchError(f"no search named {request.name!r} under {storage}: check --name and --storage-path")
        fields = {f.name for f in dataclasses.fields(SearchRequest)}
        resumed = SearchRequest(**{k: v for k, v in saved["request"].items() if k in fields})
        return resumed, saved["space"], saved
    request = dataclasses.replace(request, name=request.name or default_name(request.model))
    root = state.join(storage, request.name)
    if state.read(root) is not None:
        raise SearchError(
            f"a search named {request.name!r} already exists under {storage}: add --resume to continue it, or "
            "choose another --name"
        )
    space = load_space(request.space)
    space_data = {
        **{n: {d.kind: list(d.args)} for n, d in space.dimensions.items()},
        **space.fixed,
        "options": {"start_fraction": space.start_fraction},
    }
    saved = {
        "request": dataclasses.asdict(request),
        "space": space_data,
        "sparsities": {},
        "status": "running",
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return request, space_data, saved


def _parent_params(
    request: SearchRequest, space: SearchSpace, seed_point: dict, seed_source: str, grace: int, concurrency: int
) -> dict:
    """The parent run's parameters beyond the shared config: the space, the seed, the settings."""
    params = {f"space.{k}": v for k, v in space.describe().items()}
    params.update({f"seed.{k}": v for k, v in seed_point.items()})
    params.update(
        {
            "seed.source": seed_source,
            "search.algorithm": request.search,
            "search.scheduler": request.scheduler,
            "search.trials": request.trials,
            "search.grace_period": grace,
            "search.reduction_factor": request.reduction_factor,
            "search.max_concurrent": concurrency,
            "search.trial_resources": request.trial_resources,
            "search.workers_per_trial": request.workers_per_trial,
            "search.cpus_per_worker": request.cpus_per_worker,
            "search.max_val_loss": request.max_val_loss,
            "search.seed": request.search_seed,
            "search.space_file": request.space or "default",
        }
    )
    return params


def _search_one(
    request, where, space, base, sparsity, entry, root, uri, grace, concurrency, echo, extra_callbacks, saved
) -> SparsityOutcome:
    from ray import tune as ray_tune

    from pipelines.ray_session import local_cores_per_task

    key = _sparsity_key(sparsity)
    experiment_path = state.join(root, key)
    seed = paper_seed(space, request.model, sparsity)
    if entry.get("status") == "done" and entry.get("parent_run_id"):
        echo(f"{key}: already finished (MLflow parent run {entry['parent_run_id']}); reading its results")
        grid = ray_tune.ResultGrid(ray_tune.ExperimentAnalysis(experiment_path))
        return _summarise(grid, request, space, base, sparsity, entry["parent_run_id"], experiment_path, seed, uri)
    if entry.get("parent_run_id"):
        parent = entry["parent_run_id"]
        runs.reopen(uri, parent)
    else:
        parent = runs.open_parent(
            uri,
            request.experiment,
            base,
            _parent_params(request, space, seed.point, seed.source, grace, concurrency),
            run_name=f"{request.name}@{sparsity:g}",
            tags={"search": request.name, "sparsity": str(sparsity)},
        )
        entry["parent_run_id"] = parent
        state.write(root, saved)
    echo(
        f"{key}: MLflow parent run {parent} ({uri}, experiment {request.experiment!r}); seed {seed.source}: "
        f"{seed.point}"
    )
    context = TrialContext(
        base=base,
        space=space,
        search_name=request.name,
        tracking_uri=uri,
        experiment=request.experiment,
        parent_run_id=parent,
        train_storage=state.join(root, "train", key),
        workers=request.workers_per_trial,
        use_gpu=request.gpu,
        cpus_per_worker=request.cpus_per_worker,
        export=request.export,
        train_env={k: v for k, v in os.environ.items() if k.startswith("RAY_TRAIN_")},
        threads_per_worker=local_cores_per_task(where.address, request.gpu, concurrency * request.workers_per_trial),
    )
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(run_trial, context=context),
        ray_tune.PlacementGroupFactory([dict(request.trial_resources)]),
    )
    started = time.perf_counter()
    try:
        if ray_tune.Tuner.can_restore(experiment_path):
            if not where.resume:
                raise SearchError(f"{experiment_path} holds a Tune experiment already: add --resume")
            echo(f"{key}: restoring the Tune experiment at {experiment_path}")
            tuner = ray_tune.Tuner.restore(
                experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=where.resume_errored
            )
        else:
            tuner = ray_tune.Tuner(
                trainable,
                param_space=space.param_space(),
                tune_config=ray_tune.TuneConfig(
                    search_alg=make_searcher(request.search, [seed.point], request.trials, request.search_seed),
                    scheduler=make_scheduler(request.scheduler, base["steps"], grace, request.reduction_factor),
                    num_samples=request.trials,
                    max_concurrent_trials=concurrency,
                    # A stopped trial's actor must die: only then do its Ray Train controller and
                    # workers (owned by that actor) die with it. A reused actor would keep the
                    # stopped trainer running, and holding its CPUs, in the background.
                    reuse_actors=False,
                ),
                run_config=ray_tune.RunConfig(
                    name=key,
                    storage_path=root,
                    stop=DivergenceStopper(request.max_val_loss),
                    callbacks=[
                        runs.TrialRunsCallback(uri, request.experiment, parent, base["steps"], request.max_val_loss),
                        *(extra_callbacks or []),
                    ],
                    failure_config=ray_tune.FailureConfig(max_failures=0),
                ),
            )
        grid = tuner.fit()
    except BaseException as err:
        runs.finish(
            uri,
            parent,
            "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED",
            {"error": f"{type(err).__name__}: {err}"},
        )
        raise
    outcome = _summarise(grid, request, space, base, sparsity, parent, experiment_path, seed, uri)
    outcome.wall_s = time.perf_counter() - started
    if outcome.interrupted:
        runs.close_interrupted(uri, request.experiment, parent)
    _log_parent(uri, parent, outcome)
    return outcome


def _summarise(grid, request, space, base, sparsity, parent, experiment_path, seed, uri) -> SparsityOutcome:
    rows = trial_rows(grid, base["steps"], request.max_val_loss, seed.point)
    children = {
        run.data.tags.get("trial_id"): run.info.run_id for run in runs.children(uri, request.experiment, parent)
    }
    for row in rows:
        row.mlflow_run_id = children.get(row.trial_id)
    finished = grid.num_terminated + grid.num_errors
    outcome = SparsityOutcome(
        sparsity, parent, experiment_path, rows, best_row(rows), next((r for r in rows if r.is_seed), None), seed.source
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
    if outcome.seed is not None and outcome.seed.val_loss_projected is not None:
        metrics["seed_val_loss_projected"] = outcome.seed.val_loss_projected
    tracking.log_metrics(uri, parent, {k: v for k, v in metrics.items() if v is not None and math.isfinite(float(v))})
    tags = {"seed_source": outcome.seed_source}
    if outcome.best is not None:
        tags.update(best_trial_id=outcome.best.trial_id, best_run_id=outcome.best.mlflow_run_id or "")
    if outcome.interrupted:
        runs.finish(uri, parent, "KILLED", {**tags, "interrupted": "true"})
    else:
        runs.finish(uri, parent, "FINISHED", tags)


def _write_presets(request, where, space, bases, outcomes, root, uri) -> str:
    """The best configuration per (model, sparsity) as a preset file, logged to each parent run."""
    entries = [preset_entry(request.model, o, space, bases[o.sparsity], request.name) for o in outcomes]
    local_root = root if "://" not in root else str(Path("outputs", request.name).resolve())
    path = where.preset_out or state.join(local_root, PRESET_FILE)
    if "://" in path:
        raise SearchError(f"--preset-out {path}: write the preset file to a local path")
    from elsa.presets import write_preset_file

    written = write_preset_file(path, merge_entries(path, entries))
    mlflow_client = tracking.client(uri)
    for outcome in outcomes:
        mlflow_client.log_artifact(outcome.parent_run_id, str(written))
    return str(written)
