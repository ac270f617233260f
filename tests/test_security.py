"""What listens where, and that secrets in URIs never reach the terminal or MLflow."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest

from pipelines.records.redact import redact
from pipelines.run.errors import one_line


@pytest.mark.parametrize(
    "text, secret, kept",
    [
        ("http://alice:s3cret@mlflow.internal:5000", "s3cret", "http://alice:***@mlflow.internal:5000"),
        (
            "error talking to https://bob:p%40ss@host/api: refused",
            "p%40ss",
            "error talking to https://bob:***@host/api: refused",
        ),
        ("https://ghp_TOKEN123@github.com/x", "ghp_TOKEN123", "https://***@github.com/x"),
        (
            "s3://bucket/path?X-Amz-Signature=abcdef&token=xyz",
            "xyz",
            "s3://bucket/path?X-Amz-Signature=abcdef&token=***",
        ),
        (
            "postgresql://u:pw@db:5432/mlflow and sqlite:///x.db",
            "pw@",
            "postgresql://u:***@db:5432/mlflow and sqlite:///x.db",
        ),
    ],
)
def test_redact_masks_secrets(text, secret, kept):
    masked = redact(text)
    assert secret not in masked
    assert masked == kept


def test_redact_leaves_plain_text_alone():
    for text in ("lr=0.001 must be > 0", "http://127.0.0.1:5000", "/data/file.txt", "sqlite:////tmp/mlflow.db"):
        assert redact(text) == text


class _WorkerGroupError(RuntimeError):
    """Shaped like ray.train.WorkerGroupError: a wrapper text and the ranks' exceptions."""

    def __init__(self, failures):
        super().__init__("Training failed due to worker errors:\n[Rank 0]\nTraceback (most recent call last): ...")
        self.worker_failures = failures


class _UserExceptionWithTraceback(RuntimeError):
    def __init__(self, exc):
        super().__init__("Traceback (most recent call last):\n  File ...\n" + str(exc))
        self._base_exc = exc


def test_worker_error_reaches_the_terminal_as_its_own_line():
    from elsa.loop import DivergedError

    inner = DivergedError("training diverged at step 5: loss 1.3e+08 ...: lower --lr or --rho")
    err = _WorkerGroupError({1: ValueError("other rank"), 0: _UserExceptionWithTraceback(inner)})
    line = one_line(err)
    assert line.startswith("worker rank 0: DivergedError: training diverged at step 5")
    assert "Training failed due to worker errors" not in line


def test_own_errors_and_secrets_in_one_line():
    assert one_line(ValueError("--output x is not empty")) == "--output x is not empty"
    assert "pw" not in one_line(ConnectionError("cannot reach http://me:pw@host:5000\nmore"))


def test_mlflow_params_are_masked(tmp_path):
    """A real sqlite MLflow store: a URI with a password in a config value is logged masked."""
    import mlflow

    from pipelines.records import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "masking", {"data": "https://user:hunter2@data.example/x.jsonl", "lr": 0.1})
    params = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).data.params
    assert params["data"] == "https://user:***@data.example/x.jsonl"
    assert params["lr"] == "0.1"


_LISTENERS = textwrap.dedent("""
    import json, logging, os, psutil, ray
    from pipelines.run.ray_session import STATE_API_LOGGERS, init_ray
    init_ray(None, num_cpus=1)
    @ray.remote
    def levels():
        return [logging.getLogger(name).level for name in STATE_API_LOGGERS]
    print("WORKER LEVELS " + json.dumps(ray.get(levels.remote())))
    me = psutil.Process()
    addresses = []
    for process in [me, *me.children(recursive=True)]:
        try:
            addresses += [c.laddr.ip for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    ray.shutdown()
    print("LISTEN " + json.dumps(addresses))
""")


@pytest.mark.ray
def test_local_ray_listens_on_loopback_only(tmp_path):
    """Every listening socket of the local Ray that the CLI starts (GCS, raylet, workers, agents) is 127.0.0.1."""
    result = subprocess.run(
        [sys.executable, "-c", _LISTENERS], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    line = next((x for x in result.stdout.splitlines() if x.startswith("LISTEN ")), None)
    assert line is not None, result.stderr[-3000:]
    addresses = json.loads(line.removeprefix("LISTEN "))
    assert len(addresses) >= 3  # GCS, raylet and at least a worker or an agent
    outside = [a for a in addresses if a not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not outside, addresses
    # no dashboard, so no state API: the workers' loggers that could only warn of that are quiet
    assert f"WORKER LEVELS [{logging.ERROR}]" in result.stdout, result.stdout[-2000:]
