"""One ``elsa prune``: config -> MLflow run -> Ray Train (or a one-shot task) -> checkpoint -> eval.

Order matters for the user: everything that can be wrong with the input is checked before Ray
starts; the checkpoint is written and logged before evaluation begins, so a failing evaluation
never costs the pruned model; the MLflow run is closed FAILED with the reason on any error.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from elsa.config import PruneConfig
from pipelines import tracking
from pipelines.errors import one_line
from pipelines.redact import redact
from pipelines.storage import download

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """How and where to run (not part of the method's config)."""

    output: str = "outputs/pruned"
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
    overwrite: bool = False
    parent_run_id: str | None = None
    extra_tags: dict = field(default_factory=dict)


@dataclass
class JobResult:
    run_id: str
    checkpoint_dir: str
    metrics: dict
    eval_errors: dict
    wall_s: float
    queued: str | None = None  # where undelivered MLflow records wait, and the command that sends them


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS) when given, else start Ray locally."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "0")}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        pin_train_coordinator()
    else:
        loopback_only(ray)
        ray.init(num_cpus=num_cpus, runtime_env=env, log_to_driver=True, include_dashboard=False,
                 _node_ip_address="127.0.0.1")


def loopback_only(ray) -> None:
    """Make a Ray started here listen on 127.0.0.1 only (GCS, raylet, object manager, workers).

    Why: Ray's servers bind to all interfaces unless the node's address is the loopback one, and
    on Linux ``ray.init`` replaces 127.0.0.1 by the machine's outward address, so the GCS and
    every worker's gRPC port would be open to the network, unauthenticated. The constant below
    (read at each call) and the environment variable (for Ray's child processes) turn that off;
    the dashboard is not started. A joined cluster (``--address``) is configured by its owner.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


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
    """Everything checkable before Ray starts (see :mod:`pipelines.preflight`), then the tracking server."""
    from pipelines.preflight import preflight_checks

    uri = tracking.resolve_tracking_uri(options.tracking_uri)
    preflight_checks(cfg, options, uri)
    return uri


def run_prune(cfg: PruneConfig, options: RunOptions, echo=print) -> JobResult:
    """The whole job; raises with a one-line reason on failure (the run is marked FAILED).

    After the run is opened, MLflow is written through journals on local disk
    (:mod:`pipelines.outbox`): a tracking server that goes away costs neither the training nor
    the model; what it missed is delivered when it returns, or later by ``elsa sync``.
    """
    from pipelines.outbox import Outbox, queue_root
    from pipelines.storage import run_storage

    uri = preflight(cfg, options)
    cfg_dict = cfg.model_dump(mode="json")
    run_id = tracking.start_run(
        uri, options.experiment, cfg_dict, run_name=options.run_name,
        tags={"workers": str(options.workers), **options.extra_tags}, parent_run_id=options.parent_run_id,
    )
    echo(f"MLflow run {run_id} ({redact(uri)}, experiment {options.experiment!r})")
    started = time.perf_counter()
    queue = str(queue_root(run_storage(options.storage_path)))
    outbox = Outbox(uri, run_id, queue, "driver")
    flush_s = float(os.environ.get("ELSA_TRACKING_FLUSH_S", "60"))
    try:
        init_ray(options.address)
        output = str(Path(options.output).resolve())
        info = {"uri": uri, "run_id": run_id, "queue_dir": queue, "flush_s": flush_s}
        train_metrics, location = _prune(cfg, options, info)
        _replace_output(output, options.overwrite)
        download(location, output)
        outbox.metrics(train_metrics, cfg.steps)
        outbox.tags({"checkpoint_location": location})
        _log_outputs(outbox, output)
        metrics, errors = {}, {}
        if not options.no_eval:
            from pipelines.evaluation import run_evaluation

            echo("evaluating: " + ", ".join(cfg.eval_datasets + list(cfg.lm_eval_tasks)))
            metrics, errors = run_evaluation(location, cfg, use_gpu=options.gpu)
            outbox.metrics(metrics, 0)
            if errors:
                outbox.tags({"eval_errors": json.dumps(errors)})
        metrics = {**train_metrics, **metrics}
        outbox.end("FINISHED")
    except BaseException as err:
        outbox.tags({"error": f"{one_line(err)}\n{type(err).__name__}: {err}"})
        outbox.end("FAILED" if not isinstance(err, KeyboardInterrupt) else "KILLED")
        _flush(queue, run_id, uri, min(flush_s, 10.0), echo)
        raise
    queued = _flush(queue, run_id, uri, flush_s, echo)
    return JobResult(run_id, output, metrics, errors, time.perf_counter() - started, queued)


def _flush(queue: str, run_id: str, uri: str, wait_s: float, echo) -> str | None:
    """Deliver the run's journals, retrying for up to ``wait_s``; else say where they are and how to send them."""
    from pipelines.outbox import fail_fast_requests, pending_count, sync

    deadline, pause = time.monotonic() + wait_s, 1.0
    while True:
        try:
            with fail_fast_requests():
                sync(queue, run_id, uri)
            return None
        except Exception as err:  # noqa: BLE001 - the server is away; the records are safe on disk
            if time.monotonic() + pause > deadline:
                left = pending_count(queue, run_id)
                note = (f"MLflow server unreachable ({one_line(err)}): {left} records of run {run_id} are kept in "
                        f"{queue}; upload them with: elsa sync --queue-dir {queue} --run {run_id}")
                echo(note)
                return note
            time.sleep(pause)
            pause = min(pause * 2, 15.0)


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


def _replace_output(output: str, overwrite: bool) -> None:
    """With --overwrite, the old contents go first: stale shards must not mix with the new model."""
    import shutil

    if overwrite and Path(output).is_dir():
        shutil.rmtree(output)


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


def _log_outputs(outbox, output: str) -> None:
    """Checkpoint, sparsity report and per-layer plot as artifacts of the run (journaled, then sent)."""
    from pipelines.plots import plot_layer_sparsity

    out = Path(output)
    report = json.loads((out / "sparsity_report.json").read_text())
    plot = plot_layer_sparsity(report, out / "layer_sparsity.png")
    outbox.artifacts(out, "checkpoint")
    outbox.artifacts(plot)
    outbox.artifacts(out / "sparsity_report.json")


def summary_table(result: JobResult) -> str:
    """What the user reads at the end: the numbers and where everything went."""
    lines = [f"run id      {result.run_id}", f"checkpoint  {result.checkpoint_dir}", f"wall time   {result.wall_s:.1f} s"]
    for key in sorted(k for k in result.metrics if k != "step"):  # step: Ray Train's report index
        value = result.metrics[key]
        lines.append(f"{key:<28}{value:.6g}" if isinstance(value, float) else f"{key:<28}{value}")
    for key, error in result.eval_errors.items():
        lines.append(f"{key:<28}FAILED: {error}")
    if result.queued:
        lines.append(result.queued)
    return "\n".join(lines)
