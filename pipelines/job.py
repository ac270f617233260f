"""One ``elsa prune``: config -> MLflow run -> Ray Train (or a one-shot task) -> checkpoint -> eval.

Order matters for the user: everything that can be wrong with the input is checked before Ray
starts; the checkpoint is written and logged before evaluation begins, so a failing evaluation
never costs the pruned model; the MLflow run is closed FAILED with the reason on any error.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field

from elsa.config import PruneConfig
from pipelines import tracking

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """How and where to run (not part of the method's config)."""

    output: str | None = None  # a local copy of the export; the durable one is the MLflow artifact
    workers: int = 1
    gpu: bool = False
    address: str | None = None
    storage_path: str | None = None
    tracking_uri: str | None = None
    experiment: str = tracking.DEFAULT_EXPERIMENT
    run_name: str | None = None
    no_eval: bool = False
    max_failures: int = 0
    cpus_per_worker: float | None = None
    parent_run_id: str | None = None
    extra_tags: dict = field(default_factory=dict)
    keep_checkpoints: bool = False  # keep the run's storage folder (Ray Train checkpoints, export)
    register: str | None = None  # MLflow registered model to add a version to
    command: str | None = None  # the command line, for the model card
    progress: bool = True  # the progress line on stdout during training


@dataclass
class JobResult:
    run_id: str
    checkpoint_dir: str
    metrics: dict
    eval_errors: dict
    wall_s: float
    export: dict = field(default_factory=dict)  # format, dtype, weights_bytes, registered


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS) when given, else start Ray locally."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "0")}}
    from pipelines.quiet import ray_init_kwargs

    if address:
        ray.init(address=address, runtime_env=env, **ray_init_kwargs())
        pin_train_coordinator()
    else:
        ray.init(num_cpus=num_cpus, runtime_env=env, **ray_init_kwargs())


def pin_train_coordinator() -> None:
    """Create Ray Train's autoscaling coordinator on this driver's node before any trainer runs.

    Why: every Ray Train (V2) controller calls Ray's ``get_or_create_autoscaling_coordinator``,
    which creates a *detached* actor pinned (hard node affinity) to the caller's node. A Tune
    trial's controller runs on an autoscaled worker node, so the actor lands there and that node
    is never idle again: the autoscaler cannot remove it after the search (measured with the fake
    multi-node provider: one worker stayed up indefinitely, with all its resources free and only
    this actor alive on it). Created first from the driver, the actor lives on the driver's node
    (the head, under ``ray job submit``), and the controllers reuse it (``get_if_exists``).
    The function is Ray-internal: on a Ray without it this does nothing.
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        log.debug("this Ray has no autoscaling coordinator; nothing to pin")
        return
    get_or_create_autoscaling_coordinator()


def preflight(cfg: PruneConfig, options: RunOptions) -> str:
    """Everything checkable before Ray starts: model name, data, tracking server, resources."""
    from elsa.data import load_text
    from elsa.models import resolve_model

    if options.workers < 1:
        raise ValueError(f"--workers {options.workers} must be >= 1")
    if cfg.batch_size % options.workers:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --workers {options.workers}")
    resolve_model(cfg.model)
    load_text(cfg.data, "train")  # offline and not cached: fails here, naming the dataset
    uri = tracking.resolve_tracking_uri(options.tracking_uri)
    tracking.check_reachable(uri)
    return uri


def run_prune(cfg: PruneConfig, options: RunOptions, echo=print) -> JobResult:
    """The whole job; raises with a one-line reason on failure (the run is marked FAILED)."""
    uri = preflight(cfg, options)
    cfg_dict = cfg.model_dump(mode="json")
    run_id = tracking.start_run(
        uri, options.experiment, cfg_dict, run_name=options.run_name,
        tags={"workers": str(options.workers), **options.extra_tags}, parent_run_id=options.parent_run_id,
    )
    echo(f"MLflow run {run_id} ({uri}, experiment {options.experiment!r})")
    started = time.perf_counter()
    try:
        init_ray(options.address)
        with _progress(cfg, options) as sink:
            tracking_info = {"uri": uri, "run_id": run_id, **({"progress": sink} if sink else {})}
            train_metrics, location = _prune(cfg, options, tracking_info)
        tracking.log_metrics(uri, run_id, train_metrics, cfg.steps)
        tracking.client(uri).set_tag(run_id, "checkpoint_location", location)
        metrics, errors, export = _publish(cfg, options, uri, run_id, location, echo)
        metrics = {**train_metrics, **metrics}
        tracking.end_run(uri, run_id, "FINISHED")
    except BaseException as err:
        tracking.client(uri).set_tag(run_id, "error", f"{type(err).__name__}: {err}"[:5000])
        tracking.end_run(uri, run_id, "FAILED" if not isinstance(err, KeyboardInterrupt) else "KILLED")
        raise
    return JobResult(run_id, export.pop("location"), metrics, errors, time.perf_counter() - started, export)


def _prune(cfg: PruneConfig, options: RunOptions, tracking_info: dict) -> tuple[dict, str]:
    """ELSA trains under Ray Train; one-shot baselines run as one Ray task.

    Returns the final metrics and the storage location (path or URI) of the exported
    checkpoint, which every node can read.
    """
    from pipelines.storage import checkpoint_uri, run_storage

    name = options.run_name or f"elsa-{tracking_info['run_id'][:8]}"
    storage = run_storage(options.storage_path)
    if cfg.method == "elsa":
        from pipelines.train_job import run_training

        cpus = options.cpus_per_worker or local_cores_per_task(options.address, options.gpu, options.workers)
        resources = {"CPU": cpus} if cpus else None
        result = run_training(
            cfg, tracking_info, workers=options.workers, use_gpu=options.gpu, storage_path=storage, name=name,
            max_failures=options.max_failures, resources_per_worker=resources,
        )
        if result.error:
            raise result.error
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return metrics, checkpoint_uri(result.checkpoint)
    import ray

    from pipelines.oneshot import oneshot_task

    location = f"{storage.rstrip('/')}/{name}/export"
    resources = {"num_gpus": 1} if options.gpu else {"num_cpus": options.cpus_per_worker or local_cores_per_task(options.address, options.gpu, 1) or 1}
    metrics = ray.get(oneshot_task.options(**resources).remote(cfg.model_dump(mode="json"), location, tracking_info))
    return metrics, location


def local_cores_per_task(address: str | None, gpu: bool, tasks: int) -> int | None:
    """On a Ray this command started itself, the machine's cores shared among ``tasks`` workers.

    Why: Ray limits a task's threads (OMP_NUM_THREADS) to the CPUs it asked for, 1 by default,
    so one CPU worker on a many-core machine would run at a fraction of a bare process's speed
    (measured: see bench/results/pipeline_overhead.json). On a joined cluster (``address``,
    RAY_ADDRESS) or with a GPU, None: Ray's default stands (size workers with --cpus-per-worker).
    """
    import ray

    if gpu or address or os.environ.get("RAY_ADDRESS"):
        return None
    total = min(int(ray.cluster_resources().get("CPU", 0)), os.cpu_count() or 1)
    return max(1, total // max(tasks, 1)) if total else None


@contextlib.contextmanager
def _progress(cfg: PruneConfig, options: RunOptions):
    """The driver's progress line during training (ELSA only: one-shot methods have no steps)."""
    if cfg.method != "elsa" or not options.progress:
        yield None
        return
    from pipelines.progress import ProgressPrinter

    with ProgressPrinter(cfg.steps, cfg.batch_size * cfg.grad_accum * cfg.seqlen) as printer:
        yield printer.sink()


def _publish(cfg: PruneConfig, options: RunOptions, uri: str, run_id: str, location: str, echo) -> tuple[dict, dict, dict]:
    """Log the export (the durable copy), evaluate it, update its card, copy/register it, clean up.

    Returns (evaluation metrics, evaluation errors, export summary with its ``location``).
    """
    from pipelines import publish
    from pipelines.storage import materialized

    metrics, errors = {}, {}
    with materialized(location) as local:
        export = publish.export_summary(local)
        export["location"] = publish.log_export(uri, run_id, local, options.command)
        if not options.no_eval:
            from pipelines.evaluation import run_evaluation

            echo("evaluating: " + ", ".join(cfg.eval_datasets + list(cfg.lm_eval_tasks)))
            metrics, errors = run_evaluation(location, cfg, use_gpu=options.gpu, echo=echo if options.progress else None)
            tracking.log_metrics(uri, run_id, metrics)
            if errors:
                tracking.client(uri).set_tag(run_id, "eval_errors", json.dumps(errors)[:5000])
            publish.update_card(uri, run_id, local, options.command, metrics)
        if options.output:
            export["location"] = publish.copy_output(local, options.output)
        if options.register:
            ppl = next((metrics[k] for k in sorted(metrics) if k.startswith("ppl_")), None)
            tags = {"sparsity": cfg.sparsity, "pattern": cfg.pattern, "method": cfg.method, "ppl": ppl,
                    "export_format": export["format"], "model": cfg.model}
            export["registered"] = f"{options.register} v{publish.register(uri, run_id, options.register, tags)}"
    if not options.keep_checkpoints:
        from pipelines.storage import run_storage

        publish.remove_run_storage(location, run_storage(options.storage_path))
    return metrics, errors, export


def summary_table(result: JobResult) -> str:
    """What the user reads at the end: the numbers and where everything went."""
    lines = [f"run id      {result.run_id}", f"checkpoint  {result.checkpoint_dir}"]
    if result.export:
        size = result.export.get("weights_bytes", 0) / 1e6
        lines.append(f"export      {result.export.get('format')}, {result.export.get('dtype')}, {size:.1f} MB of weights")
    if result.export.get("registered"):
        lines.append(f"registered  {result.export['registered']}")
    lines.append(f"wall time   {result.wall_s:.1f} s")
    for key in sorted(k for k in result.metrics if k != "step"):  # step: Ray Train's report index
        value = result.metrics[key]
        lines.append(f"{key:<28}{value:.6g}" if isinstance(value, float) else f"{key:<28}{value}")
    for key, error in result.eval_errors.items():
        lines.append(f"{key:<28}FAILED: {error}")
    return "\n".join(lines)
