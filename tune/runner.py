"""A whole search: for each sparsity, one Ray Tune ``Tuner`` over pruning runs, tracked in MLflow.

Why one Tuner per sparsity: the projected validation loss at 90% sparsity is naturally higher than
at 70%, so ASHA and the searcher must only ever compare trials of the same sparsity, and each
sparsity has its own seed points (tune/seed.py). The sparsities run one after another under one search name;
the state file (:mod:`tune.state`) records each one's parent run and whether it is done, so an
interrupted search resumes where it stopped: finished sparsities are skipped, an interrupted
Tuner is restored with ``Tuner.restore`` (finished trials are not rerun; trials cut off mid-run
restart, resuming from their last Ray Train checkpoint when ``checkpoint_interval`` is set).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from elsa.config import ConfigError, make_config
from pipelines.records import tracking
from pipelines.run.capacity import RESOURCE_TIMEOUT_S, CapacityError, run_bundles, timeout_problem, wait_for_capacity
from pipelines.run.storage import run_storage
from tune import state
from tune.errors import SearchError
from tune.one_sparsity import Search, search_one, sparsity_key
from tune.results import SparsityOutcome, merge_entries, preset_entry
from tune.search import DEFAULT_MAX_VAL_LOSS, TRIAL_RETRIES, make_scheduler
from tune.space import Dimension, SearchSpace, load_space, parse_space, trial_config

DEFAULT_EXPERIMENT = "elsa-tune"
PRESET_FILE = "best_presets.yaml"


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
    resource_timeout: float = RESOURCE_TIMEOUT_S  # seconds a joined cluster may take to hold one trial
    trial_retries: int = TRIAL_RETRIES  # restarts of a trial that raised (a lost node): Tune's max_failures


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


def feasible_space(space: SearchSpace, base: dict, echo) -> SearchSpace:
    """``space`` without the choice values the user's config refuses, so no trial fails on them.

    Why: the default space searches ``allocation`` (OWL or uniform), and OWL sets each block's
    sparsity itself, which an N:M pattern or a sparsity map forbid; such a search runs uniform
    only. The config (elsa/config.py) decides, as it does for ``elsa prune``. A choice left with one
    value becomes a fixed field; with none, the search is refused. ``base``: the user's config at
    a sparsity of the search (``_base_config``).
    """
    dimensions, fixed = dict(space.dimensions), dict(space.fixed)
    for name, dim in space.dimensions.items():
        if dim.kind != "choice":
            continue
        kept, refused = [], []
        for value in dim.args:
            try:  # built as a shared start's config is (tune/one_sparsity.py), with this one value
                trial_config(base, space.overrides({name: value}, base))
                kept.append(value)
            except ConfigError as err:
                refused.append((value, str(err)))
        if not refused:
            continue
        if not kept:
            raise SearchError(f"the space's {name} choices {list(dim.args)} are all refused: {refused[0][1]}")
        del dimensions[name]
        if len(kept) == 1:
            fixed[name] = kept[0]
        else:
            dimensions[name] = Dimension(name, "choice", tuple(kept))
        echo(f"note: {name}={', '.join(str(v) for v, _ in refused)} is not searched: {refused[0][1]}")
    return dataclasses.replace(space, dimensions=dimensions, fixed=fixed)


def trial_bundles(request: SearchRequest) -> list[dict]:
    """What one trial places at once: its driver's resources, then each Ray Train worker's."""
    driver = [dict(request.trial_resources)] if any(request.trial_resources.values()) else []
    return driver + run_bundles(request.workers_per_trial, request.cpus_per_worker, request.gpu)


def _fit_check(request: SearchRequest, where: Where, echo) -> int:
    """On a local Ray, refuse trials that can never start and cap concurrency to what fits.

    Each trial holds its driver's resources while its workers start; trials started beyond what
    the CPUs hold leave workers waiting on each other (Ray Train's start-up timeout repeats),
    so concurrency is capped rather than left to wait. On a cluster (``--address``) the
    autoscaler may add nodes: the search waits (``--resource-timeout``, asking the autoscaler)
    until the cluster holds one trial, rather than leaving Tune to wait for ever in silence.
    """
    import ray

    if where.address or os.environ.get("RAY_ADDRESS"):
        try:
            wait_for_capacity(trial_bundles(request), where.resource_timeout, echo)
        except CapacityError as err:
            raise SearchError(f"{err} (one trial: --trial-resources and --workers-per-trial)") from None
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
    from pipelines.run.ray_session import init_ray

    started = time.perf_counter()
    uri = tracking.resolve_tracking_uri(where.tracking_uri)
    tracking.check_reachable(uri)
    storage = run_storage(where.storage_path)
    request, space_data, saved = _open_state(request, where, storage)
    root = state.join(storage, request.name)
    space = parse_space(space_data, request.space or "default.yaml")
    _check_request(request)
    if problem := timeout_problem(where.resource_timeout):
        raise SearchError(problem)
    if where.trial_retries < 0:
        raise SearchError(f"--trial-retries {where.trial_retries} must be >= 0 (0: a trial that raises stays failed)")
    bases = {s: _base_config(request, s) for s in request.sparsities}  # every config error, before Ray
    space = feasible_space(space, next(iter(bases.values())), echo)
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
    concurrency = _fit_check(request, where, echo)
    state.write(root, saved)  # only now: a search refused above leaves no state behind its name
    search = Search(request, where, space, root, uri, grace, concurrency, saved, echo, extra_callbacks or [])
    outcomes: list[SparsityOutcome] = []
    interrupted = False
    for sparsity in request.sparsities:
        entry = saved["sparsities"].setdefault(sparsity_key(sparsity), {})
        outcome = search_one(search, bases[sparsity], sparsity, entry)
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
