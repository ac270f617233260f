"""The Ray Train job: ``TorchTrainer`` workers run ELSA's loop on an FSDP2-sharded model.

Each worker loads the model, shards it (``fully_shard`` per decoder block, then the root; bf16
mixed precision on GPU, fp32 on CPU/gloo; no sharding with one worker), builds the ADMM
optimiser on the shards, and runs :func:`elsa.loop.train` on its slice of every global batch.
Checkpoints (model + base optimiser + z and u, via torch.distributed.checkpoint) go through
``ray.train.report`` every ``checkpoint_interval`` steps; a restarted worker group resumes from
the latest. At the end, rank 0 writes the consolidated Hugging Face checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from elsa.config import PruneConfig
from pipelines.storage import run_storage
from elsa.export import export_pruned
from elsa.loop import BatchSampler, LoopHooks, build_admm, lr_factor, train
from elsa.models import load_model, load_tokenizer
from elsa.perplexity import nll_sum
from elsa.distill import freeze
from elsa.warm_start import kept_solution, one_shot_start
from elsa.targets import decoder_blocks, sparsity_report

STATE_FILE = "elsa_state.json"


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


def _save_state(model, admm, step: int, directory: Path, run_token: str | None = None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    with _no_initialising_step(model):
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, admm)}
    dcp.save(state, checkpoint_id=str(directory))
    if not _distributed() or dist.get_rank() == 0:
        (directory / STATE_FILE).write_text(json.dumps({"step": step, "run": run_token}))


def _load_state(model, admm, directory: Path) -> int:
    """Restore model and optimiser (z, u, Adam) in place; returns the step to resume from."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    optim_state = get_optimizer_state_dict(model, admm)  # first: it initialises the base state
    state = {"model": get_model_state_dict(model), "optim": optim_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"])
    with _no_initialising_step(model):
        set_optimizer_state_dict(model, admm, state["optim"], options=_optimizer_load_options(admm))
    return int(json.loads((directory / STATE_FILE).read_text())["step"])


@contextlib.contextmanager
def _no_initialising_step(model):
    """torch.distributed.checkpoint "initialises" an optimiser without state by a zero-gradient
    step, unless some gradient exists. With plain SGD (never any state for the dense parameters)
    that step ran at every checkpoint save and after every load, and for ADMM it is a real step:
    step count + 1, a z/u-update when due, the decoupled pull. Zero gradients, set only for the
    duration of the call, make torch skip it; an optimiser that has state is unaffected."""
    added = [p for p in model.parameters() if p.requires_grad and p.grad is None]
    for param in added:
        param.grad = torch.zeros_like(param)
    try:
        yield
    finally:
        for param in added:
            param.grad = None


def _optimizer_load_options(admm):
    """Plain SGD keeps no state for the parameters ADMM does not prune (embeddings, norms), so
    torch's strict check ("Missing optimizer state for parameter ...") would refuse every SGD
    checkpoint; other base optimisers keep state for every parameter and stay strict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=not isinstance(admm.base, torch.optim.SGD))


def train_loop_per_worker(config: dict) -> None:
    """Entry point of every Ray Train worker. ``config``: {"cfg": dict, "tracking": ..., "export": bool}."""
    import ray.train
    from ray.train import Checkpoint

    cfg = PruneConfig(**config["cfg"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(cfg.seed)

    checkpoint = newest_checkpoint(ray.train.get_checkpoint(), config.get("run_token"))
    # resuming, the checkpoint holds every weight: an in-worker warm start is not recomputed
    model, tokenizer, init_s = _starting_model(
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
        with checkpoint.as_directory() as directory:
            if not (Path(directory) / STATE_FILE).is_file():
                raise RuntimeError(
                    f"Ray Train run {context.get_experiment_name()!r} already finished (its last checkpoint is the "
                    "exported model): choose a new --run-name"
                )
            start = _load_state(model, admm, Path(directory))
        scheduler = torch.optim.lr_scheduler.LambdaLR(admm, lr_factor(cfg), last_epoch=start - 1)
        logger({"resumed_from_step": start}, start)

    def on_metrics(metrics: dict, step: int) -> None:
        logger(metrics, step)
        if "val_loss_projected" in metrics:  # what Tune's schedulers watch
            ray.train.report({**metrics, "step": step})

    def on_checkpoint(step: int) -> None:
        with tempfile.TemporaryDirectory() as directory:
            _save_state(model, admm, step, Path(directory), config.get("run_token"))
            ray.train.report(
                {"step": step, "checkpoint_step": step},
                checkpoint=Checkpoint.from_directory(directory),
                checkpoint_dir_name=f"{STEP_PREFIX}{step:08d}",
            )
        for callback in config.get("after_checkpoint") or ():
            callback(step)

    hooks = LoopHooks(on_metrics=on_metrics, on_checkpoint=on_checkpoint, validation_loss=validation_loss)
    started = time.perf_counter()
    history = train(model, admm, scheduler, sampler, cfg, hooks, start_step=start, teacher=teacher)
    train_seconds = time.perf_counter() - started
    admm.final_projection()
    final = {"train_s": train_seconds, "steps_run": cfg.steps - start}
    if init_s is not None:
        final["init_s"] = init_s
    if history:
        final["final_val_loss_projected"] = next(
            (h["val_loss_projected"] for h in reversed(history) if "val_loss_projected" in h), float("nan")
        )
    if init_val_loss is not None:  # never worse than the start: the driver ships the start instead
        final["init_val_loss"] = init_val_loss
        final_loss = final["final_val_loss_projected"] if "final_val_loss_projected" in final else validation_loss()
        final["kept"] = kept_solution(init_val_loss, final_loss)
    if not config.get("export", True):  # Tune trials: measure only, no HF checkpoint
        logger({k: v for k, v in final.items() if isinstance(v, (int, float))}, cfg.steps)
        ray.train.report({**final, "step": cfg.steps})
        return
    if final.get("kept") == "init":  # no export; a marker checkpoint carries the final metrics to the driver
        logger({k: v for k, v in final.items() if isinstance(v, (int, float))}, cfg.steps)
        with tempfile.TemporaryDirectory() as directory:
            (Path(directory) / "kept.json").write_text(json.dumps(final))
            ray.train.report(
                {**final, "step": cfg.steps}, checkpoint=Checkpoint.from_directory(directory) if rank == 0 else None
            )
        return
    # The HF checkpoint is the run's last Ray Train checkpoint: Ray uploads it to the storage
    # path, where the driver and the evaluation tasks find it, whichever node they are on.
    with tempfile.TemporaryDirectory() as directory:
        final.update(_export(model, tokenizer, admm, cfg, directory, rank))
        logger({k: v for k, v in final.items() if isinstance(v, (int, float))}, cfg.steps)
        ray.train.report(
            {**final, "step": cfg.steps}, checkpoint=Checkpoint.from_directory(directory) if rank == 0 else None
        )


def _starting_model(cfg: PruneConfig, init_location: str | None, device, world: int, one_shot: bool = True):
    """The model ADMM starts from: the one-shot solution written upstream, else ``cfg.model``.

    With ``cfg.init`` set and no upstream solution (Tune trials, the single-process API), the
    one-shot method runs here, before sharding, on every rank; rank 0's result is broadcast so
    that thread-count differences between ranks cannot split the solution.
    Returns (model, tokenizer, one-shot seconds or None).
    """
    from pipelines.storage import materialized

    if init_location:
        with materialized(init_location) as directory:
            return load_model(directory).to(device), load_tokenizer(directory), None
    model, tokenizer = load_model(cfg.model).to(device), load_tokenizer(cfg.model)
    init_s = one_shot_start(model, tokenizer, cfg) if cfg.init != "none" and one_shot else None
    if init_s is not None and world > 1:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    return model, tokenizer, init_s


def _teacher(cfg: PruneConfig, device, world: int):
    """The dense starting model, frozen and sharded like the student, for kd losses (else None)."""
    if cfg.loss == "ntp":
        return None
    teacher = load_model(cfg.model).to(device)
    if world > 1:
        shard_model(teacher, device)
    return freeze(teacher)


STEP_PREFIX = "elsa_step_"


def newest_checkpoint(registered, run_token: str | None):
    """On a restart, the newest complete checkpoint in the run's storage, not only the last one Ray registered.

    Why: Ray Train registers a reported checkpoint when its controller next polls the worker; a
    worker killed in between (SIGKILL, a lost node) leaves the newest checkpoint uploaded but
    unknown, and the restart would redo every step since the one before (measured: 19 of 29), or
    all of them when none was registered yet. A folder counts when every byte range its
    torch.distributed.checkpoint metadata names is there and its ``elsa_state.json`` carries this
    ``fit()``'s ``run_token``: a fresh run never picks up folders an earlier run left under the name.
    """
    if not run_token:
        return registered
    try:
        import pyarrow.fs as pafs
        import ray.train
        from ray.train import Checkpoint

        storage = ray.train.get_context().get_storage()
        fs, root = storage.storage_filesystem, storage.experiment_fs_path
        state_file = fs.get_file_info(f"{registered.path}/{STATE_FILE}") if registered is not None else None
        if state_file is not None and state_file.type != pafs.FileType.File:
            return registered  # the exported model: the run had finished
        registered_step = _checkpoint_step(registered) if registered is not None else None
        best, best_step = registered, registered_step if registered_step is not None else -1

        for info in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
            if info.type != pafs.FileType.Directory or not info.base_name.startswith(STEP_PREFIX):
                continue
            step = int(info.base_name.removeprefix(STEP_PREFIX))
            if step > best_step and _complete(fs, info.path, run_token):
                best, best_step = Checkpoint(info.path, fs), step
        return best
    except Exception:  # noqa: BLE001 - a Ray without this developer API: what Ray registered
        return registered


def _complete(fs, path: str, run_token: str | None = None) -> bool:
    """Every byte range that the checkpoint's metadata names is there, and the state file of this
    run too (several ranks upload into one folder, each its own shard files, in no given order)."""
    import pickle

    import pyarrow.fs as pafs

    try:
        with fs.open_input_file(f"{path}/{STATE_FILE}") as handle:
            state = json.loads(handle.read())
    except (OSError, ValueError):
        return False
    if run_token is not None and state.get("run") != run_token:
        return False
    try:
        with fs.open_input_file(f"{path}/.metadata") as handle:
            metadata = pickle.loads(handle.read())  # written by torch's dcp.save into our own storage
    except (OSError, pickle.UnpicklingError, EOFError):
        return False
    needed: dict[str, int] = {}
    for item in (getattr(metadata, "storage_data", None) or {}).values():
        name = item.relative_path
        needed[name] = max(needed.get(name, 0), item.offset + item.length)
    for name, size in needed.items():
        found = fs.get_file_info(f"{path}/{name}")
        if found.type != pafs.FileType.File or found.size < size:
            return False
    return bool(needed)


def _checkpoint_step(checkpoint) -> int | None:
    name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
    return int(name.removeprefix(STEP_PREFIX)) if name.startswith(STEP_PREFIX) else None


_LOGGERS: list = []  # this worker's queued loggers, closed by _worker_entry


def _make_logger(tracking: dict | None, rank: int):
    """Rank 0's metrics sink: the run's MLflow journal (or the client), and the driver's progress line."""
    if rank != 0 or not tracking:
        return lambda metrics, step: None
    if tracking.get("queue_dir"):
        from pipelines.outbox import QueuedRunLogger

        mlflow_logger = QueuedRunLogger(tracking["uri"], tracking["run_id"], tracking["queue_dir"])
        _LOGGERS.append((mlflow_logger, float(tracking.get("flush_s", 60.0))))
    else:
        from pipelines.tracking import RunLogger

        mlflow_logger = RunLogger(tracking["uri"], tracking["run_id"])
    progress = tracking.get("progress")  # the driver's progress line (pipelines.progress)
    if progress is None:
        return mlflow_logger

    def log(metrics: dict, step: int) -> None:
        progress(metrics, step)
        mlflow_logger(metrics, step)

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
    ``after_checkpoint``, callables of the step run by every worker after each checkpoint
    (tests inject faults with it; the pipeline passes none).
    """
    from pipelines.trainer import build_trainer

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
