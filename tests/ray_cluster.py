"""Real local Ray clusters for tests: a head (optionally autoscaling with Ray's fake multi-node
provider) owned by one test, a sampler of its alive nodes, and the tiny model and `elsa tune`
command the cluster tests run.

Each head is started with `ray start --head` in a new session, on free ports, with a fresh token
(Ray token auth on, as on the cloud clusters) and its own temp dir, and is reached only by
explicit address. Teardown ends exactly the processes of that session, by pid: `ray stop` is not
used because it signals every Ray process on the machine (with --force at once, without it after
a grace period), which would take down other people's clusters too.

The fake provider's workers are extra raylets on this machine. By default they join the head at
<node ip>:6379; `provider.gcs_address` points them at the head's real port, so these tests never
need (or collide on) port 6379.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import yaml
from conftest import free_ports

REPO = Path(__file__).resolve().parents[1]
FAKE_CONFIG = REPO / "clusters" / "fake_local.yaml"
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def node_ip() -> str:
    import ray.util

    return ray.util.get_node_ip_address()


def dashboard_deps_error() -> str | None:
    import ray._private.utils as ray_utils

    err = ray_utils.get_dashboard_dependency_error()
    return None if err is None else f"{type(err).__name__}: {err}"


def kill_all(procs: list, timeout: float) -> None:
    """SIGKILL each process (those already gone are skipped), then wait up to ``timeout`` s for them."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=timeout)


class LocalRayHead:
    """A `ray start --head` cluster owned by this test, ended by pid on exit."""

    def __init__(self, *, num_cpus: int, autoscaling_config: dict | None = None, dashboard: bool = True):
        self.num_cpus = num_cpus
        self.autoscaling_config = autoscaling_config
        self.dashboard = dashboard
        self.root = Path(tempfile.mkdtemp(prefix="elsa-rc-", dir="/tmp"))  # short: socket paths
        self.ip = node_ip()
        self.gcs_port, self.dashboard_port, self.agent_port = free_ports(3)
        self.address = f"{self.ip}:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.sid: int | None = None
        self.leftover: list[str] = []
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = {
            k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
        }
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0")
        # As on a cluster node, `python` is the interpreter that has Ray and this project: a job's
        # entrypoint (`python -m cli ...`) resolves it from the head's PATH, and pytest
        # run as `.venv/bin/python -m pytest` does not put the venv on PATH by itself.
        bin_dir = str(Path(sys.executable).parent)
        self.env["PATH"] = os.pathsep.join([bin_dir, self.env.get("PATH", "")])

    def __enter__(self) -> "LocalRayHead":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        cmd = RAY_CLI + [
            "start",
            "--head",
            f"--port={self.gcs_port}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--temp-dir={self.root / 'ray'}",
            "--disable-usage-stats",
            "--object-store-memory=200000000",
            f"--dashboard-agent-listen-port={self.agent_port}",
            f"--include-dashboard={'true' if self.dashboard else 'false'}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
        ]
        env = dict(self.env)
        if self.autoscaling_config is not None:
            cfg = self.root / "autoscaling.yaml"
            cfg.write_text(yaml.safe_dump(self.autoscaling_config))
            cmd.append(f"--autoscaling-config={cfg}")
            env["RAY_FAKE_CLUSTER"] = "1"
        log = self.root / "ray_start.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            self.sid = proc.pid  # the session leader's pid is the session id
            rc = proc.wait(timeout=120)
        if rc != 0:
            raise RuntimeError(f"ray start failed ({rc}):\n{log.read_text()[-3000:]}")

    def session_processes(self, owned_only: bool = True) -> list:
        """Processes in this cluster's session; with owned_only, only those that also carry
        this cluster's token path in their environment (a guard against a reused session id)."""
        procs = []
        for p in psutil.process_iter(["name"]):
            try:
                if os.getsid(p.pid) != self.sid:
                    continue
                if owned_only and p.environ().get("RAY_AUTH_TOKEN_PATH") != self.env["RAY_AUTH_TOKEN_PATH"]:
                    continue
                procs.append(p)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        return procs

    def stop(self) -> None:
        """SIGTERM this cluster's processes (raylets, then the rest, GCS last), then SIGKILL."""
        if self.sid is not None:
            assert self.sid != os.getsid(0), "refusing to signal the test's own session"

            def rank(p) -> int:
                name = p.info.get("name") or ""
                return 0 if "raylet" in name else 2 if "gcs_server" in name else 1

            for bucket in (0, 1, 2):
                procs = [p for p in self.session_processes() if rank(p) == bucket]
                for p in procs:
                    try:
                        p.send_signal(signal.SIGTERM)
                    except psutil.Error:
                        pass
                _, alive = psutil.wait_procs(procs, timeout=10)
                kill_all(alive, timeout=5)
            deadline = time.time() + 10
            while self.session_processes(owned_only=False) and time.time() < deadline:
                time.sleep(0.5)
            self.leftover = [f"{p.pid} {p.info.get('name')}" for p in self.session_processes(owned_only=False)]
        shutil.rmtree(self.root, ignore_errors=True)

    def wait_for_dashboard(self, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:  # it answers (401 without the token): it is up
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"dashboard did not answer on {self.dashboard_url}")


_POLLER = textwrap.dedent("""
    import json, os, sys, time, ray
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
    while not os.path.exists(sys.argv[2]):
        alive = [n for n in ray.nodes() if n["Alive"]]
        head = [n["NodeID"] for n in alive if "node:__internal_head__" in n["Resources"]]
        workers = sorted(n["NodeID"] for n in alive if "node:__internal_head__" not in n["Resources"])
        print(json.dumps({"t": time.time(), "head": head, "workers": workers}), flush=True)
        time.sleep(1)
""")


class NodeTimeline:
    """Samples the cluster's alive nodes once a second from a separate process."""

    def __init__(self, head: LocalRayHead):
        self.stop_file = head.root / "poller.stop"
        self.samples: list[dict] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _POLLER, head.address, str(self.stop_file)],
            env=head.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append(json.loads(line))
            except ValueError:
                pass

    def wait_for(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.samples and predicate(self.samples[-1]):
                return self.samples[-1]
            if self.proc.poll() is not None:
                raise RuntimeError("the node poller exited")
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.stop_file.touch()
                self.proc.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=5)

    def render(self, t0: float, marks: dict[str, float]) -> str:
        """One line per change of the alive-worker count (plus the marks), relative to t0."""
        events = [(m - t0, f"-- {name}") for name, m in marks.items()]
        last = None
        for s in self.samples:
            n = len(s["workers"])
            if n != last:
                events.append((s["t"] - t0, f"alive worker nodes: {n}"))
                last = n
        if self.samples:
            events.append((self.samples[-1]["t"] - t0, f"alive worker nodes: {last} (last sample)"))
        return "\n".join(f"  t={t:+7.1f}s  {text}" for t, text in sorted(events))


def tiny_model(workdir: Path) -> Path:
    from elsa.tiny import save_tiny

    return save_tiny(workdir / "tiny-llama", "llama", seed=0)


def autoscaling_head() -> LocalRayHead:
    """A head with 0 CPUs and clusters/fake_local.yaml's autoscaler (worker type `trainer_worker`:
    1 CPU, resource `trainer`, 0-2 nodes, 6 s idle timeout), its workers pointed at the head's port."""
    config = yaml.safe_load(FAKE_CONFIG.read_text())
    head = LocalRayHead(num_cpus=0, autoscaling_config=config)
    config["provider"]["gcs_address"] = head.address  # written at start; they would dial <ip>:6379
    return head


def tune_command(model: Path, address: str, workdir: Path, name: str, extra: list[str]) -> list[str]:
    """`elsa tune` of the tiny model at 70% on the cluster at ``address``: 2 trials at once, each
    driver asking for {"CPU": 0.5, "trainer": 1} (only the autoscaled worker type offers `trainer`)
    and its Ray Train worker for 0.5 CPU; MLflow in ``workdir``/mlflow.db, experiment ``name``."""
    return [
        *(sys.executable, "-m", "cli", "tune", "--model", str(model), "--sparsity", "0.7"),
        *("--trials", "2", "--seqlen", "64", "--batch-size", "2", "--val-blocks", "2"),
        *("--scheduler", "none", "--max-concurrent", "2", "--cpus-per-worker", "0.5"),
        *("--trial-resources", json.dumps({"CPU": 0.5, "trainer": 1}), "--address", address),
        *("--storage-path", str(workdir / "storage"), "--name", name),
        *("--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--experiment", name),
        *extra,
    ]


def search_runs(workdir: Path, experiment: str) -> tuple[list, list]:
    """The search's MLflow runs in ``workdir``/mlflow.db: (parents, children)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found is not None else []
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


_WHO_HOLDS = textwrap.dedent("""
    import sys
    from ray.util.state import list_actors
    for a in list_actors(address=sys.argv[1], filters=[("state", "=", "ALIVE")]):
        print(a.node_id, a.class_name, a.name, a.is_detached)
""")


def alive_actors(head: LocalRayHead) -> str:
    """Alive actors and their nodes (what keeps a worker node from going idle), for a failure message."""
    proc = subprocess.run(
        [sys.executable, "-c", _WHO_HOLDS, head.dashboard_url],
        env=head.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.stdout[-3000:] or proc.stderr[-3000:]


def monitor_log(head: LocalRayHead, chars: int = 4000) -> str:
    """The tail of the autoscaler's own log (why it did or did not launch a node), for a failure message."""
    logs = sorted((head.root / "ray").glob("session_latest/logs/monitor.*"))
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in logs) or "(no monitor log)"
