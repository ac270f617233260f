"""MLflow records journaled on local disk first, then delivered in order: an outage loses nothing.

Why: a pruning run must not depend on the tracking server after it has started. Logging straight
to a server stalls the training loop while the server is away (MLflow's client retries for
minutes) and finally fails the run. Here every record (metrics of a step, tags, artifacts, the
run's end) is appended to a JSON-lines journal in the run's storage (``<queue>/<run id>/<writer>
.jsonl``), and a cursor file counts the records delivered. A background thread (workers) or a
bounded flush (driver) sends what is pending, oldest first, and retries later when the server is
down. Metrics keep the timestamp of their first journaling, so a record sent twice (delivered,
but the cursor not yet advanced when the process died) is dropped by MLflow as a duplicate row;
a writer skips the (metric, step) pairs it journaled already, so a restarted worker or a resumed
driver logs each step once.
``elsa sync`` delivers whatever a run left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

from pipelines.records.redact import redact
from pipelines.records.tracking import mlflow_key

WRITERS = ("worker", "driver")  # delivery order: the run's end (driver) comes last
META = "meta.json"


def queue_root(storage: str) -> Path:
    """Where journals live: in the run storage when it is a local path, else in the node's temp dir."""
    from pipelines.run.storage import is_uri

    if is_uri(storage):
        import tempfile

        return Path(tempfile.gettempdir()) / "elsa-mlflow-queue"
    return Path(storage) / "mlflow-queue"


class Outbox:
    """One writer's journal of one run, and its delivery cursor."""

    def __init__(self, uri: str, run_id: str, root: str | Path, writer: str):
        self.uri, self.run_id, self.writer = uri, run_id, writer
        self.folder = Path(root) / run_id
        self.journal = self.folder / f"{writer}.jsonl"
        self.cursor_file = self.folder / f"{writer}.sent"
        self._lock = threading.Lock()
        self._seen: set[tuple[str, int]] | None = None  # (metric, step) pairs journaled, read on first use

    # writing -----------------------------------------------------------------------------
    def put(self, record: dict) -> None:
        """Append ``record`` durably (flushed before returning); never touches the network."""
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            meta = self.folder / META
            if not meta.exists():
                meta.write_text(json.dumps({"run_id": self.run_id, "uri": redact(self.uri)}))
            with open(self.journal, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())

    def metrics(self, values: dict, step: int) -> None:
        """Journal the numeric ``values`` at ``step``, except (metric, step) pairs journaled before."""
        step = int(step or 0)
        if self._seen is None:
            self._seen = {(k, r["step"]) for r in self.records() if r["kind"] == "metrics" for k in r["values"]}
        numbers = {
            k: float(v)
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and (k, step) not in self._seen
        }
        self._seen.update((k, step) for k in numbers)
        if numbers:
            self.put({"kind": "metrics", "step": step, "ts": int(time.time() * 1000), "values": numbers})

    def tags(self, values: dict) -> None:
        self.put({"kind": "tags", "values": {k: redact(str(v))[:5000] for k, v in values.items()}})

    def artifacts(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.put({"kind": "artifacts", "local_path": str(local_path), "artifact_path": artifact_path})

    def end(self, status: str) -> None:
        self.put({"kind": "end", "status": status})

    # reading and delivering ---------------------------------------------------------------
    def records(self) -> list[dict]:
        if not self.journal.is_file():
            return []
        lines = self.journal.read_text(encoding="utf-8").splitlines()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash mid-write: the last one only
                break
        return out

    def sent(self) -> int:
        try:
            return int(self.cursor_file.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def pending(self) -> list[dict]:
        return self.records()[self.sent() :]

    def _advance(self, count: int) -> None:
        tmp = self.cursor_file.with_suffix(".tmp")
        tmp.write_text(str(count))
        os.replace(tmp, self.cursor_file)

    def deliver(self, client=None) -> int:
        """Send the pending records in order; returns how many were sent. Raises on the first failure
        (the cursor stays before the failed record, so the next attempt resumes there)."""
        with self._lock:
            records = self.records()
            done = self.sent()
            if done >= len(records):
                return 0
            client = client or _client(self.uri)
            for index in range(done, len(records)):
                _send(client, self.run_id, records[index])
                self._advance(index + 1)
            return len(records) - done


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def _send(client, run_id: str, record: dict) -> None:
    from mlflow.entities import Metric, RunTag

    kind = record["kind"]
    if kind == "metrics":
        items = [Metric(mlflow_key(k), v, record["ts"], record["step"]) for k, v in record["values"].items()]
        client.log_batch(run_id, metrics=items)
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(mlflow_key(k), v) for k, v in record["values"].items()])
    elif kind == "artifacts":
        path = Path(record["local_path"])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=record.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(path), artifact_path=record.get("artifact_path"))
    elif kind == "end":
        client.set_terminated(run_id, status=record["status"])
    else:
        raise ValueError(f"unknown journal record kind {kind!r}")


_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_fail_fast_lock = threading.Lock()
_fail_fast_state: dict = {"users": 0, "added": []}


@contextlib.contextmanager
def fail_fast_requests():
    """MLflow's client retries a dead server for minutes per call; the outbox retries itself,
    so within this block a call fails at once (settings the user gave win; restored after).

    MLflow reads these settings from the environment at each request, so they must be there; the
    delivery thread and the driver may be inside at once: the first to enter sets them, the last
    to leave removes them, under one lock, so no thread sees them vanish mid-call."""
    with _fail_fast_lock:
        if _fail_fast_state["users"] == 0:
            _fail_fast_state["added"] = [key for key in _FAIL_FAST if key not in os.environ]
            os.environ.update({key: _FAIL_FAST[key] for key in _fail_fast_state["added"]})
        _fail_fast_state["users"] += 1
    try:
        yield
    finally:
        with _fail_fast_lock:
            _fail_fast_state["users"] -= 1
            if _fail_fast_state["users"] == 0:
                for key in _fail_fast_state["added"]:
                    os.environ.pop(key, None)


class QueuedRunLogger:
    """A worker's step metrics: journaled at once, delivered by a background thread (picklable)."""

    def __init__(self, uri: str, run_id: str, root: str):
        self.uri, self.run_id, self.root = uri, run_id, root
        self._outbox: Outbox | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._closing = False

    def __getstate__(self):
        return {"uri": self.uri, "run_id": self.run_id, "root": self.root}

    def __setstate__(self, state):
        self.__init__(state["uri"], state["run_id"], state["root"])

    def _start(self) -> Outbox:
        if self._outbox is None:
            self._outbox = Outbox(self.uri, self.run_id, self.root, "worker")
            self._thread = threading.Thread(target=self._run, name="elsa-mlflow-outbox", daemon=True)
            self._thread.start()
        return self._outbox

    def __call__(self, metrics: dict, step: int) -> None:
        self._start().metrics(metrics, step)
        self._wake.set()

    def _run(self) -> None:
        backoff = 1.0
        while True:
            try:
                with fail_fast_requests():
                    self._outbox.deliver()
                backoff = 1.0
                if self._closing:
                    return
                self._wake.wait(5.0)
            except Exception:  # noqa: BLE001 - the server is away: keep the records, retry later
                if self._closing and not self._outbox.pending():
                    return
                self._wake.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            self._wake.clear()

    def close(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for delivery; returns the records still pending (kept on disk)."""
        if self._outbox is None:
            return 0
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)
        return len(self._outbox.pending())


def metrics_sink(tracking: dict | None, progress=None):
    """Where a Ray task's step metrics go: the driver's progress line (``progress``), and the run's
    journal when ``tracking`` names a ``queue_dir`` (else MLflow's client). Returns (log, the
    journal's logger or None: close it with a bounded wait when the task ends)."""
    sinks, journal = [progress] if progress is not None else [], None
    if tracking and tracking.get("queue_dir"):
        journal = QueuedRunLogger(tracking["uri"], tracking["run_id"], tracking["queue_dir"])
        sinks.append(journal)
    elif tracking:
        from pipelines.records.tracking import RunLogger

        sinks.append(RunLogger(tracking["uri"], tracking["run_id"]))

    def log(metrics: dict, step: int) -> None:
        for sink in sinks:
            sink(metrics, step)

    return log, journal


def runs_in(root: str | Path) -> list[str]:
    """Run ids with a journal under ``root``."""
    root = Path(root)
    return sorted(p.name for p in root.iterdir() if (p / META).is_file()) if root.is_dir() else []


def sync(root: str | Path, run_id: str, uri: str | None = None) -> dict[str, int]:
    """Deliver everything pending for ``run_id``: worker records first, the driver's (and the run's end) last."""
    folder = Path(root) / run_id
    target = uri or json.loads((folder / META).read_text())["uri"]
    client = _client(target)
    return {writer: Outbox(target, run_id, root, writer).deliver(client) for writer in WRITERS}


def pending_count(root: str | Path, run_id: str) -> int:
    return sum(len(Outbox("", run_id, root, writer).pending()) for writer in WRITERS)
