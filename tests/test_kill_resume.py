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
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from elsa.config import make_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1800)]

STEPS = 8


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
    from pipelines.run.worker_state import STEP_PREFIX, complete as _complete

    import pyarrow.fs as pafs

    fs = pafs.LocalFileSystem()
    folders = [p for p in root.glob(f"*/{STEP_PREFIX}*") if _complete(fs, str(p))]
    return sorted(int(p.name.removeprefix(STEP_PREFIX)) for p in folders)


def _last_journaled_step(queue: Path) -> int:
    """The newest step whose train_loss the workers journaled (pipelines.records.outbox), 0 if none."""
    import json

    steps = [0]
    for journal in queue.glob("*/worker.jsonl"):
        for line in journal.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("kind") == "metrics" and "train_loss" in record["values"]:
                steps.append(record["step"])
    return max(steps)


def _kill_after_checkpoint(root: Path, step: int, record: dict, queue: Path) -> threading.Thread:
    def watch():
        deadline = time.time() + 600
        while time.time() < deadline:
            steps = _complete_steps(root)
            if steps and steps[-1] >= step:
                pids = _trainer_pids()
                if pids:
                    record["newest_at_kill"] = _complete_steps(root)[-1]
                    record["pid"] = pids[0]
                    record["killed_at"] = time.time()
                    os.kill(pids[0], signal.SIGKILL)
                    record["step_at_kill"] = _last_journaled_step(queue)  # rank 0 may log one more step
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _load(directory):
    from elsa.model_io.export import load_checkpoint

    return load_checkpoint(directory)[0]  # reads the compressed export (the default at >= 50%)


# Adam, the default. The kill and the restore do not depend on the optimiser; SGD (no optimiser
# state for unpruned parameters, which torch's loader once refused), AdamW and bitsandbytes' 8-bit
# Adam resume bit-identically through the same save/load path in tests/test_resume_sgd.py, in process.
def test_sigkilled_worker_resumes_from_newest_checkpoint(tmp_path, tiny_model_dir, ray_session, capsys):
    import mlflow

    from pipelines.records import tracking
    from pipelines.run.train_job import run_training

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
            "lr": 1e-3,
            "init": "none",
        }
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "kill", cfg.model_dump(mode="json"))
    info = {"uri": uri, "run_id": run_id, "queue_dir": str(tmp_path / "queue"), "flush_s": 60}
    storage = tmp_path / "ray"
    record: dict = {}
    watcher = _kill_after_checkpoint(storage, 4, record, tmp_path / "queue")
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
    (resumed,) = client.get_metric_history(run_id, "resumed_from_step")
    assert resumed.value == float(resumed_from)
    # what the kill cost: steps done again, and seconds from the SIGKILL to the restored state
    redone = max(record["step_at_kill"] - resumed_from, 0)
    to_resume = resumed.timestamp / 1000 - record["killed_at"]
    assert redone <= 3 and 0 < to_resume < 300
    with capsys.disabled():
        print(
            f"\nSIGKILL of worker pid {record['pid']} after step {record['step_at_kill']} (newest checkpoint "
            f"{record['newest_at_kill']}): resumed from step {resumed_from}, {redone} step(s) redone, "
            f"{to_resume:.1f} s from the kill to the restored state"
        )


DRIVER_RUN = [
    "--sparsity", "0.7", "--steps", str(STEPS), "--seqlen", "64", "--batch-size", "2", "--interval", "2",
    "--eval-interval", "6", "--val-blocks", "2", "--checkpoint-interval", "2", "--lr", "1e-3", "--no-eval",
    "--calib-blocks", "4",
]  # fmt: skip


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started (its local Ray too): a lost head node."""
    import psutil

    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            process.kill()
        except psutil.Error:
            pass


def _cli(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_driver_killed_then_resume_run_id_finishes_bit_identically(tmp_path, tiny_model_dir):
    """`elsa prune` (its own Ray) is SIGKILLed with all it started after the step-4 checkpoint;
    `elsa prune --resume RUN_ID` continues the same MLflow run from the newest checkpoint, logs
    each step once, does not recompute the warm start, and ships the weights of an uninterrupted run."""
    import mlflow

    work = tmp_path / "work"
    work.mkdir()
    command = ["prune", "--model", str(tiny_model_dir), *DRIVER_RUN]
    driver = subprocess.Popen(
        [sys.executable, "-m", "cli", *command, "--output", "killed"],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")},
    )
    deadline, newest = time.time() + 600, []
    while time.time() < deadline and driver.poll() is None:
        newest = _complete_steps(work / "elsa-runs")
        if newest and newest[-1] >= 4:
            _kill_tree(driver.pid)
            break
        time.sleep(0.05)
    driver.wait(timeout=60)
    assert newest and newest[-1] >= 4, "the driver ended before its step-4 checkpoint"
    assert newest[-1] < STEPS

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("elsa").experiment_id])
    assert run.info.status == "RUNNING"  # nobody closed it: the driver died
    refused = _cli(["prune", "--resume", run.info.run_id, "--sparsity", "0.5"], work)
    assert refused.returncode == 2 and "--sparsity" in refused.stderr

    (start,) = (work / "elsa-runs").glob("*/init/config.json")  # the warm start, written before the kill
    written = start.stat().st_mtime_ns
    resumed = _cli(
        ["prune", "--resume", run.info.run_id, "--no-eval", "--output", "resumed", "--keep-checkpoints"], work
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, STEPS + 1))  # each step once, the redone ones included
    (resumed_from,) = [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_step")]
    assert resumed_from >= newest[-1]
    assert start.stat().st_mtime_ns == written  # the warm start was not redone

    clean = _cli([*command, "--output", "clean", "--experiment", "clean"], work)
    assert clean.returncode == 0, clean.stderr[-3000:]
    # the warm start's progress line, per decoder block (2 in the tiny model); its last state is always printed
    assert "sparsegpt (warm start): block 2/2 (100%) |" in clean.stdout, clean.stdout[-3000:]
    resumed_model, clean_model = _load(work / "resumed"), _load(work / "clean")
    for (name, a), b in zip(resumed_model.state_dict().items(), clean_model.state_dict().values()):
        assert torch.equal(a, b), name

    # a driver that died after the training had finished: --resume publishes Ray Train's result
    client.update_run(run.info.run_id, status="RUNNING")
    again = _cli(["prune", "--resume", run.info.run_id, "--no-eval", "--output", "again"], work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training had finished" in again.stdout
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == steps
    assert len(client.get_metric_history(run.info.run_id, "resumed_from_step")) == 1  # no worker ran
    assert len(client.get_metric_history(run.info.run_id, "final_val_loss_projected")) == 1  # the driver's too
    for (name, a), b in zip(_load(work / "again").state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
