"""A worker's training state on disk: save and restore it, and find the newest complete one.

The state is the model, the base optimiser and ADMM's z and u, written with
torch.distributed.checkpoint (each rank its shards) plus ``elsa_state.json`` (the step and the
``fit()``'s run token) in a folder ``elsa_step_<step>`` of the Ray Train run.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

STATE_FILE = "elsa_state.json"
STEP_PREFIX = "elsa_step_"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def save_state(model, admm, step: int, directory: Path, run_token: str | None = None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    with _no_initialising_step(model):
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, admm)}
    dcp.save(state, checkpoint_id=str(directory))
    if not _distributed() or dist.get_rank() == 0:
        (directory / STATE_FILE).write_text(json.dumps({"step": step, "run": run_token}))


def load_state(model, admm, directory: Path) -> int:
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
        registered_step = checkpoint_step(registered) if registered is not None else None
        best, best_step = registered, registered_step if registered_step is not None else -1

        for info in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
            if info.type != pafs.FileType.Directory or not info.base_name.startswith(STEP_PREFIX):
                continue
            step = int(info.base_name.removeprefix(STEP_PREFIX))
            if step > best_step and complete(fs, info.path, run_token):
                best, best_step = Checkpoint(info.path, fs), step
        return best
    except Exception:  # noqa: BLE001 - a Ray without this developer API: what Ray registered
        return registered


def complete(fs, path: str, run_token: str | None = None) -> bool:
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


def checkpoint_step(checkpoint) -> int | None:
    name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
    return int(name.removeprefix(STEP_PREFIX)) if name.startswith(STEP_PREFIX) else None
