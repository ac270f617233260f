"""The Ray Train job: ``TorchTrainer`` workers run ELSA's loop on an FSDP2-sharded model.

Each worker loads the model, shards it (``fully_shard`` per decoder block, then the root; bf16
mixed precision on GPU, fp32 on CPU/gloo; no sharding with one worker), builds the ADMM
optimiser on the shards, and runs :func:`elsa.loop.train` on its slice of every global batch.
Checkpoints (model + base optimiser + z and u, via torch.distributed.checkpoint) go through
``ray.train.report`` every ``checkpoint_interval`` steps; a restarted worker group resumes from
the latest. At the end, rank 0 writes the consolidated Hugging Face checkpoint.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from elsa.allocation import ALLOCATION_FILE, resolve_allocation
from elsa.weight_scale import read_weight_scale, resolve_on_dense, resolve_lr
from elsa.config import PruneConfig
from pipelines.run.storage import run_storage
from pipelines.run.worker_state import STATE_FILE, STEP_PREFIX, load_state, newest_checkpoint, save_state
from elsa.model_io.export import export_pruned
from elsa.loop import BatchSampler, LoopHooks, build_admm, lr_factor, train, use_bf16
from elsa.model_io.models import load_model, load_tokenizer
from elsa.perplexity import nll_sum
from elsa.distill import freeze, lean_teacher
from elsa.methods.warm_start import kept_solution, one_shot_start
from elsa.targets import decoder_blocks, sparsity_report


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2: one unit per decoder block, then the root (bf16 compute on GPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    _, blocks = decoder_blocks(model)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _validation_loss(model, blocks: torch.Tensor, rank: int, world: int):
    """Mean NLL of the validation blocks, split over ranks and summed across them."""

    def compute() -> float:
        mine = blocks[rank::world]
        total, count = nll_sum(model, mine) if len(mine) else (0.0, 0)
        sums = torch.tensor([total, float(count)], dtype=torch.float64)
        if _distributed():
            dist.all_reduce(sums)
        return float(sums[0] / max(sums[1], 1.0))

    return compute


def train_loop_per_worker(config: dict) -> None:
    """Entry point of every Ray Train worker. ``config``: {"cfg": dict, "tracking": ..., "export": bool}."""
    import ray.train

    cfg = PruneConfig(**config["cfg"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(cfg.seed)

    checkpoint = newest_checkpoint(ray.train.get_checkpoint(), config.get("run_token"))
    # resuming, the checkpoint holds every weight: an in-worker warm start is not recomputed
    model, tokenizer, init_s, cfg = _starting_model(
        cfg, config.get("init_location"), device, world, one_shot=checkpoint is None
    )
    teacher = _teacher(cfg, device, world)
    if world > 1:
        shard_model(model, device)
    admm, scheduler = build_admm(model, cfg)
    sampler = BatchSampler(tokenizer, cfg, rank=rank, world=world)
    logger = _make_logger(config.get("tracking"), rank)
    validation_loss = _validation_loss(model, sampler.validation(), rank, world)
    # x0 is the one-shot solution (not known again when an in-worker start was not recomputed)
    has_start = cfg.init != "none" and (config.get("init_location") or checkpoint is None)
    init_val_loss = validation_loss() if has_start else None

    start = 0
    if checkpoint is not None:
        start = _resume(checkpoint, model, admm, context.get_experiment_name())
        scheduler = torch.optim.lr_scheduler.LambdaLR(admm, lr_factor(cfg), last_epoch=start - 1)
        logger({"resumed_from_step": start}, start)

    hooks = _worker_hooks(model, admm, config, logger, validation_loss)
    started = time.perf_counter()
    history = train(model, admm, scheduler, sampler, cfg, hooks, start_step=start, teacher=teacher)
    final = {"train_s": time.perf_counter() - started, "steps_run": cfg.steps - start}
    admm.final_projection()
    if init_s is not None:
        final["init_s"] = init_s
    if isinstance(cfg.sparsity_map, dict):  # an OWL allocation: the band its blocks span
        final.update(sparsity_min=min(cfg.sparsity_map.values()), sparsity_max=max(cfg.sparsity_map.values()))
    final.update(_final_losses(history, init_val_loss, validation_loss))
    _deliver(final, model, tokenizer, admm, cfg, config, rank, logger)


def _resume(checkpoint, model, admm, run_name: str) -> int:
    """Restore the worker's state from ``checkpoint``; returns the step it was written after."""
    with checkpoint.as_directory() as directory:
        if not (Path(directory) / STATE_FILE).is_file():
            raise RuntimeError(
                f"Ray Train run {run_name!r} already finished (its last checkpoint is the "
                "exported model): choose a new --run-name"
            )
        return load_state(model, admm, Path(directory))


def _worker_hooks(model, admm, config: dict, logger, validation_loss) -> LoopHooks:
    """Metrics to MLflow (and Tune's schedulers), checkpoints to Ray Train."""
    import ray.train
    from ray.train import Checkpoint

    def on_metrics(metrics: dict, step: int) -> None:
        logger(metrics, step)
        if "val_loss_projected" in metrics:  # what Tune's schedulers watch
            ray.train.report({**metrics, "step": step})

    def on_checkpoint(step: int) -> None:
        with tempfile.TemporaryDirectory() as directory:
            save_state(model, admm, step, Path(directory), config.get("run_token"))
            ray.train.report(
                {"step": step, "checkpoint_step": step},
                checkpoint=Checkpoint.from_directory(directory),
                checkpoint_dir_name=f"{STEP_PREFIX}{step:08d}",
            )

    return LoopHooks(on_metrics=on_metrics, on_checkpoint=on_checkpoint, validation_loss=validation_loss)


def _final_losses(history: list[dict], init_val_loss: float | None, validation_loss) -> dict:
    """The last projected validation loss and, after a warm start, which solution is kept."""
    final: dict = {}
    if history:
        final["final_val_loss_projected"] = next(
            (h["val_loss_projected"] for h in reversed(history) if "val_loss_projected" in h), float("nan")
        )
    if init_val_loss is not None:  # never worse than the start: the driver ships the start instead
        final["init_val_loss"] = init_val_loss
        final_loss = final["final_val_loss_projected"] if "final_val_loss_projected" in final else validation_loss()
        final["kept"] = kept_solution(init_val_loss, final_loss)
    return final


def _deliver(final: dict, model, tokenizer, admm, cfg: PruneConfig, config: dict, rank: int, logger) -> None:
    """The run's last report: metrics only (Tune trials), a marker (the start is kept), or the export.

    The export is the run's last Ray Train checkpoint: Ray uploads it to the storage path, where
    the driver and the evaluation tasks find it, whichever node they are on.
    """
    import ray.train
    from ray.train import Checkpoint

    def numbers() -> dict:
        return {k: v for k, v in final.items() if isinstance(v, (int, float))}

    if not config.get("export", True):  # Tune trials: measure only, no HF checkpoint
        logger(numbers(), cfg.steps)
        ray.train.report({**final, "step": cfg.steps})
        return
    with tempfile.TemporaryDirectory() as directory:
        if final.get("kept") == "init":  # no export; a marker checkpoint carries the final metrics
            (Path(directory) / "kept.json").write_text(json.dumps(final))
        else:
            final.update(_export(model, tokenizer, admm, cfg, directory, rank))
        logger(numbers(), cfg.steps)
        checkpoint = Checkpoint.from_directory(directory) if rank == 0 else None
        ray.train.report({**final, "step": cfg.steps}, checkpoint=checkpoint)


def _starting_model(cfg: PruneConfig, init_location: str | None, device, world: int, one_shot: bool = True):
    """The model ADMM starts from: the one-shot solution written upstream, else ``cfg.model``.

    With ``cfg.init`` set and no upstream solution (Tune trials, the single-process API), the
    one-shot method runs here, before sharding, on every rank; rank 0's result is broadcast so
    that thread-count differences between ranks cannot split the solution. The same holds for
    an ``owl`` allocation: the upstream stage's map is read beside its solution, else rank 0's
    is computed on the dense model and broadcast.
    An unset lr is scaled to the dense weights (elsa/weight_scale.py), read beside an upstream
    solution like the allocation.
    Returns (model, tokenizer, one-shot seconds or None, cfg with its allocation and lr resolved).
    """
    from pipelines.run.storage import materialized

    if init_location:
        with materialized(init_location) as directory:
            allocation = Path(directory) / ALLOCATION_FILE
            if cfg.allocation == "owl" and allocation.is_file():
                cfg = cfg.model_copy(update={"sparsity_map": json.loads(allocation.read_text())})
            cfg = resolve_lr(cfg, read_weight_scale(directory), f"the warm start at {init_location}")
            return load_model(directory).to(device), load_tokenizer(directory), None, cfg
    model, tokenizer = load_model(cfg.model).to(device), load_tokenizer(cfg.model)
    if cfg.allocation == "owl" and world > 1:
        shared = [resolve_allocation(model, tokenizer, cfg).sparsity_map if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        cfg = cfg.model_copy(update={"sparsity_map": shared[0]})
    cfg, _ = resolve_on_dense(model, tokenizer, cfg)  # the lr is the same on every rank (same weights)
    init_s = one_shot_start(model, tokenizer, cfg) if cfg.init != "none" and one_shot else None
    if init_s is not None and world > 1:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    return model, tokenizer, init_s, cfg


def _teacher(cfg: PruneConfig, device, world: int):
    """The dense starting model, frozen and sharded like the student, for kd losses (else None);
    on one worker under bf16 autocast its linear layers are stored in bf16 (``lean_teacher``), cast
    before it moves to the device."""
    if cfg.loss == "ntp":
        return None
    teacher = freeze(load_model(cfg.model))
    if world == 1 and use_bf16(cfg, device):
        lean_teacher(teacher)
    teacher.to(device)
    if world > 1:
        shard_model(teacher, device)
    return teacher


_LOGGERS: list = []  # this worker's queued loggers, closed by _worker_entry


def _make_logger(tracking: dict | None, rank: int):
    """Rank 0's metrics sink: the run's MLflow journal (or the client), and the driver's progress line."""
    if rank != 0 or not tracking:
        return lambda metrics, step: None
    from pipelines.records.outbox import metrics_sink

    log, journal = metrics_sink(tracking, tracking.get("progress"))
    if journal is not None:
        _LOGGERS.append((journal, float(tracking.get("flush_s", 60.0))))
    return log


def _worker_entry(config: dict) -> None:
    """The worker's loop, then a bounded wait for its queued MLflow records (the rest stay on disk)."""
    try:
        train_loop_per_worker(config)
    finally:
        while _LOGGERS:
            logger, wait = _LOGGERS.pop()
            logger.close(wait)


def _export(model, tokenizer, admm, cfg: PruneConfig, output: str, rank: int) -> dict:
    """Gather the full model on rank 0, verify per-matrix sparsity, write the HF checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    result: dict = {}
    if rank == 0:
        weights = {t.name: full[t.name] for t in admm.targets}
        report = sparsity_report(admm.targets, weights)
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sparsity_report.json").write_text(json.dumps(report, indent=1))
        if not report["all_ok"]:
            bad = next(r for r in report["matrices"] if not r["ok"])
            raise RuntimeError(
                f"sparsity check failed: {bad['name']} has {bad['zeros']} zeros, expected >= {bad['expected_zeros']}"
            )
        export_model = model if not _distributed() else _unsharded_copy(cfg, full)
        export_pruned(export_model, tokenizer, cfg, out, report)
        result = {"overall_sparsity": report["overall_sparsity"]}
    if _distributed():
        dist.barrier()
    return result


def _unsharded_copy(cfg: PruneConfig, full: dict) -> torch.nn.Module:
    """A plain model holding the gathered weights (FSDP's modules cannot be saved as HF)."""
    model = load_model(cfg.model)
    missing, unexpected = model.load_state_dict(full, strict=False)
    tied = {name for name in missing if name.endswith("lm_head.weight")}
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"gathered state does not fit the model: missing {sorted(set(missing) - tied)[:3]}, unexpected "
            f"{unexpected[:3]}"
        )
    return model


def run_training(
    cfg: PruneConfig,
    tracking: dict | None,
    workers: int = 1,
    use_gpu: bool = False,
    storage_path: str | None = None,
    name: str | None = None,
    max_failures: int = 0,
    resources_per_worker: dict | None = None,
    extra: dict | None = None,
):
    """Run the TorchTrainer to completion; returns the ``ray.train.Result``.

    Its ``checkpoint`` is the exported Hugging Face model, its ``metrics`` the final numbers.
    ``extra`` entries join the workers' config: ``init_location`` (the warm start's folder) and
    ``run_token`` (marks this run's checkpoints; ``elsa prune --resume`` passes the original).
    """
    from pipelines.run.trainer import build_trainer

    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "tracking": tracking,
        "run_token": uuid.uuid4().hex,
        **(extra or {}),
    }
    trainer = build_trainer(
        _worker_entry,
        loop_config,
        workers=workers,
        use_gpu=use_gpu,
        resources_per_worker=resources_per_worker,
        name=name,
        storage_path=run_storage(storage_path),
        max_failures=max_failures,
        num_to_keep=2,
    )
    return trainer.fit()


def finished_result(storage_path: str, name: str, steps: int):
    """The ``ray.train.Result`` of Ray Train run ``name`` if its training had finished, else None.

    Finished means its last report is the final one (the export, or the marker that the start was
    kept: ``train_s`` and step ``steps``). ``elsa prune --resume`` of a run whose driver died after
    training then publishes that result instead of starting the workers again.
    """
    from ray.train import Result

    try:
        result = Result.from_path(f"{storage_path.rstrip('/')}/{name}")
    except Exception:  # noqa: BLE001 - no run folder or no snapshot yet: nothing finished
        return None
    metrics = result.metrics or {}
    if result.checkpoint is None or metrics.get("step") != steps or "train_s" not in metrics:
        return None
    return result
