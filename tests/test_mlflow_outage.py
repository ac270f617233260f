"""A real ``mlflow server`` on 127.0.0.1 killed mid-run: training goes on, nothing is lost or doubled.

The server is killed (SIGKILL of its process group) right after the run is opened, before Ray
starts; restarted on the same port and database once the worker has journaled steps, or never
(then ``elsa sync`` delivers later). Read back with MlflowClient.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from conftest import MlflowServer

BUDGET = [
    "--sparsity",
    "0.7",
    "--steps",
    "6",
    "--seqlen",
    "32",
    "--batch-size",
    "2",
    "--interval",
    "2",
    "--eval-interval",
    "3",
    "--lr",
    "1e-3",
    "--val-blocks",
    "1",
    "--cpus-per-worker",
    "1",
    "--no-eval",
]


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    srv = MlflowServer(root)
    srv.start()
    yield srv
    srv.kill()


WEIGHT_ARTIFACTS = {"checkpoint/model.safetensors", "checkpoint/model.sparse.safetensors"}  # dense or compressed


def _steps(client, run_id: str, key: str = "train_loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_outbox_delivers_in_order_once_after_an_outage(tmp_path, server):
    """No Ray: the journal and its cursor against a server that dies and returns; logging never blocks."""
    import mlflow

    from pipelines.records.outbox import QueuedRunLogger
    from pipelines.records.tracking import start_run

    run_id = start_run(server.uri, "outbox", {"lr": 0.1})
    logger = QueuedRunLogger(server.uri, run_id, str(tmp_path / "queue"))
    logger({"train_loss": 5.0}, 1)
    deadline = time.time() + 30
    while logger._start().pending() and time.time() < deadline:
        time.sleep(0.2)
    server.kill()
    slowest = 0.0
    for step in range(2, 7):
        started = time.perf_counter()
        logger({"train_loss": 5.0 - step / 10}, step)
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 0.5  # journaled, not sent: the loop never waits for the server
    time.sleep(2)
    assert len(logger._start().pending()) == 5
    server.start()
    assert logger.close(60) == 0
    client = mlflow.MlflowClient(tracking_uri=server.uri)
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert {m.step: m.value for m in history}[4] == pytest.approx(4.6)
    # a resumed worker re-logging steps 5-6 adds nothing; the journal is the memory
    again = QueuedRunLogger(server.uri, run_id, str(tmp_path / "queue"))
    again({"train_loss": 4.5}, 5)
    again({"train_loss": 4.4, "lr": 0.1, "seed_rule/loss:ntp+kd": 4.3}, 6)  # a key MLflow refuses as written
    assert again.close(30) == 0
    assert _steps(client, run_id) == [1, 2, 3, 4, 5, 6]
    assert _steps(client, run_id, "lr") == [6] and _steps(client, run_id, "seed_rule/loss:ntp_kd") == [6]


def test_a_writer_journals_each_metric_and_step_once(tmp_path):
    """No server: the driver's journal, reopened (a resumed run), skips the pairs it holds already."""
    from pipelines.records.outbox import Outbox

    first = Outbox("http://127.0.0.1:9", "run", tmp_path, "driver")
    first.metrics({"final_val_loss": 5.0, "kept_init": 0, "flag": True}, 32)
    reopened = Outbox("http://127.0.0.1:9", "run", tmp_path, "driver")
    reopened.metrics({"final_val_loss": 4.0, "ppl": 219.6}, 32)
    reopened.metrics({"final_val_loss": 3.0}, 33)
    values = [(r["step"], r["values"]) for r in reopened.records()]
    assert values == [
        (32, {"final_val_loss": 5.0, "kept_init": 0.0}),
        (32, {"ppl": 219.6}),
        (33, {"final_val_loss": 3.0}),
    ]


def _kill_when_ray_starts(monkeypatch, server) -> None:
    import pipelines.run.job as job

    real = job.init_ray

    def init_ray(*args, **kwargs):
        server.kill()  # the run is open; from here on the server is away
        return real(*args, **kwargs)

    monkeypatch.setattr(job, "init_ray", init_ray)


def _restart_after_journaled_steps(server, queue: Path, steps: int) -> threading.Thread:
    def watch():
        deadline = time.time() + 300
        while time.time() < deadline:
            journals = list(queue.glob("*/worker.jsonl"))
            if journals and len(journals[0].read_text().splitlines()) >= steps:
                server.start()
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.ray
@pytest.mark.slow
def test_server_killed_and_restarted_mid_run(tmp_path, tiny_model_dir, ray_session, server, monkeypatch, capsys):
    import mlflow

    from cli.main import main

    monkeypatch.chdir(tmp_path)
    _kill_when_ray_starts(monkeypatch, server)
    watcher = _restart_after_journaled_steps(server, tmp_path / "elsa-runs" / "mlflow-queue", 3)
    out = tmp_path / "pruned"
    rc = main(
        [
            "prune",
            "--model",
            str(tiny_model_dir),
            *BUDGET,
            "--output",
            str(out),
            "--tracking-uri",
            server.uri,
            "--experiment",
            "outage",
        ]
    )
    captured = capsys.readouterr()
    watcher.join(timeout=5)
    assert rc == 0, captured.err[-3000:]
    assert any(out.glob("*.safetensors"))
    assert "elsa sync" not in captured.out  # everything was delivered before the command returned
    client = mlflow.MlflowClient(tracking_uri=server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    assert run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id) == [1, 2, 3, 4, 5, 6]  # each step exactly once
    assert _steps(client, run.info.run_id, "val_loss_projected") == [3, 6]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")} & WEIGHT_ARTIFACTS
    assert "overall_sparsity" in run.data.metrics


@pytest.mark.ray
@pytest.mark.slow
def test_server_never_back_then_elsa_sync(tmp_path, tiny_model_dir, ray_session, server, monkeypatch, capsys):
    import mlflow

    from cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ELSA_TRACKING_FLUSH_S", "3")
    _kill_when_ray_starts(monkeypatch, server)
    out = tmp_path / "pruned"
    rc = main(
        [
            "prune",
            "--model",
            str(tiny_model_dir),
            *BUDGET,
            "--output",
            str(out),
            "--tracking-uri",
            server.uri,
            "--experiment",
            "never-back",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    assert any(out.glob("*.safetensors"))  # the model does not wait for MLflow
    queue = tmp_path / "elsa-runs" / "mlflow-queue"
    (journal_dir,) = [p for p in queue.iterdir() if p.is_dir()]
    run_id = journal_dir.name
    assert (journal_dir / "worker.jsonl").is_file() and (journal_dir / "driver.jsonl").is_file()
    assert f"elsa sync --queue-dir {queue} --run {run_id}" in captured.out

    server.start()
    client = mlflow.MlflowClient(tracking_uri=server.uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert main(["sync", "--queue-dir", str(queue), "--run", run_id, "--tracking-uri", server.uri]) == 0
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _steps(client, run_id) == [1, 2, 3, 4, 5, 6]
    assert {a.path for a in client.list_artifacts(run_id, "checkpoint")} & WEIGHT_ARTIFACTS
    assert main(["sync", "--queue-dir", str(queue), "--run", run_id, "--tracking-uri", server.uri]) == 0
    assert _steps(client, run_id) == [1, 2, 3, 4, 5, 6]  # a second sync sends nothing again


def test_fail_fast_settings_stay_while_any_thread_is_inside(monkeypatch):
    """The delivery thread and the driver overlap: the first in sets the settings, the last out
    removes them, and one the user set is never touched."""
    from pipelines.records.outbox import fail_fast_requests

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")  # the user's: wins, and stays
    inside, leave, seen = threading.Event(), threading.Event(), []

    def other_thread():
        with fail_fast_requests():
            inside.set()
            leave.wait(10)
            seen.append(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"))

    worker = threading.Thread(target=other_thread)
    with fail_fast_requests():  # this thread is in first, then the other joins
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        worker.start()
        inside.wait(10)
    leave.set()  # this thread, which set the settings, left first: the other must still see them
    worker.join(10)
    assert seen == ["0"]
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"
