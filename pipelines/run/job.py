"""One ``elsa prune``: config -> MLflow run -> Ray Train (or a one-shot task) -> checkpoint -> eval.

Order matters for the user: everything that can be wrong with the input is checked before Ray
starts; the checkpoint is written and logged before evaluation begins, so a failing evaluation
never costs the pruned model; the MLflow run is closed FAILED with the reason on any error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

from elsa.config import PruneConfig
from pipelines.records import tracking
from pipelines.run.capacity import RESOURCE_TIMEOUT_S
from pipelines.run.errors import one_line
from pipelines.run.progress import BlockLine, ProgressLine, ProgressPrinter, stage
from pipelines.records.redact import redact
from pipelines.run.ray_session import init_ray, local_cores_per_task

log = logging.getLogger(__name__)
DRIVER_METRICS = ("init_s", "kept_init")  # an ELSA run's numbers the driver has and its worker had not
RESUME_TAG = "elsa.resume"  # the run's config, Ray Train name, storage and checkpoint token (JSON)


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
    resource_timeout: float = RESOURCE_TIMEOUT_S  # seconds a joined cluster may take to provide the nodes
    overwrite: bool = False
    keep_checkpoints: bool = False  # keep the run's storage folder (Ray Train checkpoints, export)
    register: str | None = None  # MLflow registered model to add a version to
    command: str | None = None  # the command line, for the model card
    progress: bool = True  # the progress line on stdout during training
    run_token: str | None = None  # marks this run's checkpoints in the storage (None: a new one)
    resuming: bool = False  # `elsa prune --resume RUN_ID`: same run, storage, name and token


@dataclass
class JobResult:
    run_id: str
    checkpoint_dir: str
    metrics: dict
    eval_errors: dict
    wall_s: float
    queued: str | None = None  # where undelivered MLflow records wait, and the command that sends them
    export: dict = field(default_factory=dict)  # format, dtype, weights_bytes, registered


def preflight(cfg: PruneConfig, options: RunOptions, echo=print) -> str:
    """Everything checkable before Ray starts (see :mod:`pipelines.run.preflight`), the tracking server,
    and on a joined cluster a bounded wait for nodes that hold the workers (:mod:`pipelines.run.capacity`)."""
    from pipelines.run.preflight import preflight_checks

    uri = tracking.resolve_tracking_uri(options.tracking_uri)
    preflight_checks(cfg, options, uri)
    if options.address or os.environ.get("RAY_ADDRESS"):
        from pipelines.run.capacity import run_bundles, wait_for_capacity

        init_ray(options.address)
        workers = options.workers if cfg.method == "elsa" else 1
        bundles = run_bundles(workers, options.cpus_per_worker, options.gpu)
        wait_for_capacity(bundles, options.resource_timeout, echo)
    return uri


def run_prune(cfg: PruneConfig, options: RunOptions, echo=print) -> JobResult:
    """The whole job; raises with a one-line reason on failure (the run is marked FAILED).

    After the run is opened, MLflow is written through journals on local disk
    (:mod:`pipelines.records.outbox`): a tracking server that goes away costs neither the training nor
    the model; what it missed is delivered when it returns, or later by ``elsa sync``. The run
    carries what ``elsa prune --resume RUN_ID`` needs to continue it if this driver dies.
    """
    from pipelines.run.storage import run_storage

    if options.progress:
        echo(f"elsa prune: checking the model ({cfg.model}), the data and the resources")
    stage("checking the model, the data and the resources")
    uri = preflight(cfg, options, echo)
    cfg_dict = cfg.model_dump(mode="json")
    run_id = tracking.start_run(
        uri,
        options.experiment,
        cfg_dict,
        run_name=options.run_name,
        tags={"workers": str(options.workers)},
    )
    options = dataclasses.replace(
        options,
        run_name=options.run_name or f"elsa-{run_id[:8]}",
        storage_path=run_storage(options.storage_path),
        run_token=uuid.uuid4().hex,
    )
    record = {"config": cfg_dict, "name": options.run_name, "storage": options.storage_path, "token": options.run_token}
    tracking.client(uri).set_tag(run_id, RESUME_TAG, json.dumps(record))
    echo(f"MLflow run {run_id} ({redact(uri)}, experiment {options.experiment!r})")
    return _execute(cfg, options, uri, run_id, echo)


def resume_prune(run_id: str, options: RunOptions, echo=print) -> JobResult:
    """Continue run ``run_id`` whose driver died: same config, Ray Train run, storage and MLflow run.

    Ray Train restores the newest checkpoint of the run's storage; steps already journaled are
    not logged again (pipelines.records.outbox), and a warm start already written is not recomputed.
    """
    from pipelines.run.preflight import UsageError

    uri = tracking.resolve_tracking_uri(options.tracking_uri)
    tracking.check_reachable(uri)
    mlflow_client = tracking.client(uri)
    try:
        run = mlflow_client.get_run(run_id)
    except Exception as err:  # noqa: BLE001 - MLflow raises its own types for "not found"
        raise UsageError(f"--resume {run_id}: no such MLflow run at {redact(uri)} ({one_line(err)})") from None
    if RESUME_TAG not in run.data.tags:
        raise UsageError(f"--resume {run_id}: not a run started by elsa prune (it has no {RESUME_TAG} tag)")
    if run.info.status == "FINISHED":
        raise UsageError(f"--resume {run_id}: the run FINISHED already; its model is the run's 'checkpoint' artifact")
    record = json.loads(run.data.tags[RESUME_TAG])
    cfg = PruneConfig(**record["config"])
    experiment = mlflow_client.get_experiment(run.info.experiment_id).name
    options = dataclasses.replace(
        options,
        experiment=experiment,
        run_name=record["name"],
        storage_path=record["storage"],
        run_token=record["token"],
        resuming=True,
    )
    preflight(cfg, options, echo)
    mlflow_client.update_run(run_id, status="RUNNING")
    echo(f"resuming MLflow run {run_id} (Ray Train run {record['name']!r} in {record['storage']})")
    return _execute(cfg, options, uri, run_id, echo)


def _execute(cfg: PruneConfig, options: RunOptions, uri: str, run_id: str, echo) -> JobResult:
    """Train (or prune one-shot), publish and evaluate the export, close the run."""
    from pipelines.records.outbox import Outbox, queue_root

    started = time.perf_counter()
    queue = str(queue_root(options.storage_path))
    outbox = Outbox(uri, run_id, queue, "driver")
    flush_s = float(os.environ.get("ELSA_TRACKING_FLUSH_S", "60"))
    try:
        stage("starting Ray")
        init_ray(options.address)
        info = {"uri": uri, "run_id": run_id, "queue_dir": queue, "flush_s": flush_s}
        train_metrics, location = _prune(cfg, options, info, echo)
        if "kept_init" in train_metrics:
            outbox.tags({"kept": "init" if train_metrics["kept_init"] else "elsa"})
        by_worker = cfg.method == "elsa"  # ELSA's worker logged its final numbers; the driver adds its own
        outbox.metrics({k: v for k, v in train_metrics.items() if not by_worker or k in DRIVER_METRICS}, cfg.steps)
        outbox.tags({"checkpoint_location": location})
        metrics, errors, export = _publish(cfg, options, outbox, location, echo)
        metrics = {**train_metrics, **metrics}
        outbox.end("FINISHED")
    except BaseException as err:
        outbox.tags({"error": f"{one_line(err)}\n{type(err).__name__}: {err}"})
        outbox.end("FAILED" if not isinstance(err, KeyboardInterrupt) else "KILLED")
        _flush(queue, run_id, uri, min(flush_s, 10.0), echo)
        raise
    queued = _flush(queue, run_id, uri, flush_s, echo)
    export = _finish_publish(cfg, options, uri, run_id, location, export, metrics, delivered=queued is None, echo=echo)
    return JobResult(run_id, export.pop("location"), metrics, errors, time.perf_counter() - started, queued, export)


def _flush(queue: str, run_id: str, uri: str, wait_s: float, echo) -> str | None:
    """Deliver the run's journals, retrying for up to ``wait_s``; else say where they are and how to send them."""
    from pipelines.records.outbox import fail_fast_requests, pending_count, sync

    stage("delivering the run's records to MLflow")
    deadline, pause = time.monotonic() + wait_s, 1.0
    while True:
        try:
            with fail_fast_requests():
                sync(queue, run_id, uri)
            return None
        except Exception as err:  # noqa: BLE001 - the server is away; the records are safe on disk
            if time.monotonic() + pause > deadline:
                left = pending_count(queue, run_id)
                note = (
                    f"MLflow server unreachable ({one_line(err)}): {left} records of run {run_id} are kept in "
                    f"{queue}; upload them with: elsa sync --queue-dir {queue} --run {run_id}"
                )
                echo(note)
                return note
            time.sleep(pause)
            pause = min(pause * 2, 15.0)


def _prune(cfg: PruneConfig, options: RunOptions, tracking_info: dict, echo) -> tuple[dict, str]:
    """ELSA trains under Ray Train; one-shot baselines run as one Ray task.

    Returns the final metrics and the storage location (path or URI) of the exported
    checkpoint, which every node can read.
    """
    from pipelines.run.storage import checkpoint_uri, holds

    name, storage = options.run_name, options.storage_path
    if cfg.method != "elsa":
        location = f"{storage.rstrip('/')}/{name}/export"
        return _oneshot(cfg.model_dump(mode="json"), options, location, tracking_info, echo, cfg.method), location
    from pipelines.run.train_job import finished_result

    extra, init_metrics = {"run_token": options.run_token}, {}
    if cfg.init != "none":  # the warm start: an upstream task writes the one-shot solution to storage
        extra["init_location"] = f"{storage.rstrip('/')}/{name}/init"
        init_cfg = {**cfg.model_dump(mode="json"), "method": cfg.init}
        if not (options.resuming and holds(extra["init_location"], "config.json")):
            init_metrics = _oneshot(init_cfg, options, extra["init_location"], None, echo, f"{cfg.init} (warm start)")
    result = finished_result(storage, name, cfg.steps) if options.resuming else None
    if result is not None:
        echo(f"training had finished before the driver stopped: publishing Ray Train run {name!r}'s result")
    else:
        result = _train(cfg, options, tracking_info, extra)
    if result.error:
        raise result.error
    metrics = {
        k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    if init_metrics:
        metrics["init_s"] = init_metrics["prune_s"]
    if (result.metrics or {}).get("kept") == "init":
        metrics["kept_init"] = 1
        return metrics, extra["init_location"]
    if "init_location" in extra:
        metrics["kept_init"] = 0
    return metrics, checkpoint_uri(result.checkpoint)


def _train(cfg: PruneConfig, options: RunOptions, tracking_info: dict, extra: dict):
    """The ADMM run under Ray Train, with the driver's progress line; returns its ``ray.train.Result``."""
    from pipelines.run.train_job import run_training

    cpus = options.cpus_per_worker or local_cores_per_task(options.address, options.gpu, options.workers)
    resources = {"CPU": cpus} if cpus else None
    stage("Ray Train: starting the workers, loading the model, sharding it, the start's held-out loss")
    with _progress(options, ProgressLine(cfg.steps, cfg.batch_size * cfg.grad_accum * cfg.seqlen)) as sink:
        return run_training(
            cfg,
            {**tracking_info, **({"progress": sink} if sink else {})},
            workers=options.workers,
            use_gpu=options.gpu,
            storage_path=options.storage_path,
            name=options.run_name,
            max_failures=options.max_failures,
            resources_per_worker=resources,
            extra=extra,
        )


def _oneshot(cfg_dict: dict, options: RunOptions, location: str, tracking_info: dict | None, echo, label: str) -> dict:
    """One one-shot stage (a method run, or ELSA's warm start) with its per-block progress line."""
    from pipelines.run.oneshot import run_one_shot

    if options.progress:
        echo(f"{label}: one-shot pruning of {cfg_dict['model']}")
    owl = cfg_dict.get("allocation") == "owl" and not isinstance(cfg_dict.get("sparsity_map"), dict)
    scoring = ", OWL's scoring forward (the dense model over it)" if owl else ""  # 49 s of SmolLM2's demo
    stage(f"{label}: loading the model and the calibration text{scoring}, then the decoder blocks one by one")
    with _progress(options, BlockLine(label)) as sink:
        return run_one_shot(
            cfg_dict,
            location,
            tracking_info,
            address=options.address,
            gpu=options.gpu,
            cpus=options.cpus_per_worker,
            progress=sink,
        )


@contextlib.contextmanager
def _progress(options: RunOptions, line):
    """The driver's progress line (``line``: training steps, or the one-shot stage's blocks)."""
    if not options.progress:
        yield None
        return
    with ProgressPrinter(line) as printer:
        yield printer.sink()


def _publish(cfg: PruneConfig, options: RunOptions, outbox, location: str, echo) -> tuple[dict, dict, dict]:
    """Journal the export (the durable copy), evaluate it, update its card, copy it to --output.

    A remote export is first copied into the journal's folder: the journaled artifacts must
    outlive this call, since they are sent later (pipelines.records.outbox).
    Returns (evaluation metrics, evaluation errors, export summary).
    """
    from pipelines.records import publish
    from pipelines.run.storage import absolute, download, is_uri

    stage("logging the export to MLflow")
    local = str(download(location, outbox.folder / "export")) if is_uri(location) else absolute(location)
    metrics, errors = {}, {}
    export = publish.export_summary(local)
    publish.log_export(outbox, local, options.command)
    if not options.no_eval:
        from pipelines.evals.evaluation import run_evaluation

        echo("evaluating: " + ", ".join(cfg.eval_datasets + list(cfg.lm_eval_tasks)))
        stage("evaluating")
        metrics, errors = run_evaluation(
            location, cfg.evaluation(), use_gpu=options.gpu, echo=echo if options.progress else None
        )
        outbox.metrics(metrics, 0)
        if errors:
            outbox.tags({"eval_errors": json.dumps(errors)})
        publish.update_card(outbox, local, options.command, metrics)
    if options.output:
        export["output"] = publish.copy_output(local, options.output)
    return metrics, errors, export


def _finish_publish(
    cfg: PruneConfig,
    options: RunOptions,
    uri: str,
    run_id: str,
    location: str,
    export: dict,
    metrics: dict,
    delivered: bool,
    echo,
) -> dict:
    """Once the journal is delivered: register, and remove the run's storage (unless kept).

    Undelivered (the server is away), the storage copy stays: until ``elsa sync`` it is the
    durable one. ``export['location']`` is where the user finds the model.
    """
    from pipelines.records import publish

    if not delivered:
        if options.register:
            echo(f"not registered as {options.register!r}: the MLflow server is unreachable; register after elsa sync")
        export["location"] = export.get("output") or location
        return export
    export["location"] = export.get("output") or publish.artifact_uri(uri, run_id)
    if options.register:
        first = cfg.eval_datasets[0] if cfg.eval_datasets else None  # the headline text (WikiText-2 by default)
        tags = {
            "sparsity": cfg.sparsity,
            "pattern": cfg.pattern,
            "method": cfg.method,
            "ppl": metrics.get(f"ppl_{first}"),
            "ppl_dataset": first,
            "export_format": export["format"],
            "model": cfg.model,
        }
        export["registered"] = f"{options.register} v{publish.register(uri, run_id, options.register, tags)}"
    if not options.keep_checkpoints:
        from pipelines.run.storage import run_storage

        publish.remove_run_storage(location, run_storage(options.storage_path))
    return export
