"""SIGKILL of a Ray Train worker process: the run resumes from the newest written checkpoint, bit-identically.

A real local Ray, 2 gloo workers, ``max_failures=1``. A watcher thread finds a worker by its
process title (``RayTrainWorker``) once the step-4 checkpoint is in the storage, and SIGKILLs it:
no injected exception. Then: the run ends without error, resumed no earlier than the newest
complete checkpoint at the kill, its weights equal an uninterrupted run's, and the MLflow run
(sqlite) holds each step's ``train_loss`` exactly once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from elsa.config import make_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(2400)]  # two 2-worker runs

STEPS = 12


def _trainer_pids() -> list[int]:
    """Ray Train workers of this test's own Ray only (descendants of this process), never another's."""
    import psutil

    found = []
    for process in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.append(process.pid)
        except psutil.Error:
            continue
    return sorted(found)


def _complete_steps(root: Path) -> list[int]:
    from pipelines.worker_state import STEP_PREFIX, complete as _complete

    import pyarrow.fs as pafs

    fs = pafs.LocalFileSystem()
    folders = [p for p in root.glob(f"*/{STEP_PREFIX}*") if _complete(fs, str(p))]
    return sorted(int(p.name.removeprefix(STEP_PREFIX)) for p in folders)


def _kill_after_checkpoint(root: Path, step: int, record: dict) -> threading.Thread:
    def watch():
        deadline = time.time() + 600
        while time.time() < deadline:
            steps = _complete_steps(root)
            if steps and steps[-1] >= step:
                pids = _trainer_pids()
                if pids:
                    record["newest_at_kill"] = _complete_steps(root)[-1]
                    record["pid"] = pids[0]
                    os.kill(pids[0], signal.SIGKILL)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _load(directory):
    from elsa.export import load_checkpoint

    return load_checkpoint(directory)[0]  # reads the compressed export (the default at >= 50%)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_sigkilled_worker_resumes_from_newest_checkpoint(tmp_path, tiny_model_dir, ray_session, optimizer):
    import mlflow

    from pipelines import tracking
    from pipelines.train_job import run_training

    extra = {"projection": "magnitude", "lr": 1e-2} if optimizer == "sgd" else {"lr": 1e-3}
    cfg = make_config(
        {
            "model": str(tiny_model_dir),
            "sparsity": 0.7,
            "steps": STEPS,
            "seqlen": 64,
            "batch_size": 2,
            "interval": 2,
            "eval_interval": 6,
            "val_blocks": 2,
            "checkpoint_interval": 2,
            "optimizer": optimizer,
            "init": "none",
            **extra,
        }
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "kill", cfg.model_dump(mode="json"))
    info = {"uri": uri, "run_id": run_id, "queue_dir": str(tmp_path / "queue"), "flush_s": 60}
    storage = tmp_path / "ray"
    record: dict = {}
    watcher = _kill_after_checkpoint(storage, 4, record)
    killed = run_training(
        cfg,
        info,
        workers=2,
        storage_path=str(storage),
        name="killed",
        max_failures=1,
        resources_per_worker={"CPU": 0.5},
    )
    watcher.join(timeout=5)
    assert "pid" in record, "the watcher never killed a worker"
    assert killed.error is None, killed.error
    resumed_from = STEPS - killed.metrics["steps_run"]
    assert resumed_from >= record["newest_at_kill"] >= 4  # the newest written checkpoint, not an older one

    clean = run_training(
        cfg, None, workers=2, storage_path=str(storage), name="clean", resources_per_worker={"CPU": 0.5}
    )
    assert clean.error is None
    resumed_model, clean_model = _load(killed.checkpoint.path), _load(clean.checkpoint.path)
    for (name, a), b in zip(resumed_model.state_dict().items(), clean_model.state_dict().values()):
        assert torch.equal(a, b), name

    client = mlflow.MlflowClient(tracking_uri=uri)
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert sorted(steps) == list(range(1, STEPS + 1))  # each step exactly once, the redone ones included
    assert [m.value for m in client.get_metric_history(run_id, "resumed_from_step")] == [float(resumed_from)]
