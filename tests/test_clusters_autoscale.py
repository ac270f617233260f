"""Real local Ray clusters: autoscaling with Ray's fake multi-node provider, and `ray job submit`.

Each test starts its own head with `ray start --head` in a new session, on free
ports, with a fresh token (Ray token auth on, as on the cloud clusters) and its
own temp dir, and talks to it only by explicit address. Teardown ends exactly
the processes of that session, by pid: `ray stop` is not used because it signals
every Ray process on the machine (with --force at once, without it after a
grace period), which would take down other people's clusters too.

The fake provider's workers are extra raylets on this machine. By default they
join the head at <node ip>:6379; `provider.gcs_address` points them at the
head's real port, so these tests never need (or collide on) port 6379.
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

import pytest
import yaml
from conftest import free_ports

psutil = pytest.importorskip("psutil")
pytest.importorskip("ray")

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not hasattr(os, "getsid"), reason="needs POSIX sessions"),
]

REPO = Path(__file__).resolve().parents[1]
FAKE_CONFIG = REPO / "clusters" / "fake_local.yaml"
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]
SCALE_DOWN_TIMEOUT_S = 120


# --------------------------------------------------------------------------- helpers
def _node_ip() -> str:
    import ray.util

    return ray.util.get_node_ip_address()


def _dashboard_deps_error() -> str | None:
    import ray._private.utils as ray_utils

    err = ray_utils.get_dashboard_dependency_error()
    return None if err is None else f"{type(err).__name__}: {err}"


class LocalRayHead:
    """A `ray start --head` cluster owned by this test, ended by pid on exit."""

    def __init__(self, *, num_cpus: int, autoscaling_config: dict | None = None, dashboard: bool = True):
        self.num_cpus = num_cpus
        self.autoscaling_config = autoscaling_config
        self.dashboard = dashboard
        self.root = Path(tempfile.mkdtemp(prefix="elsa-rc-", dir="/tmp"))  # short: socket paths
        self.ip = _node_ip()
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
                for p in alive:
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
                psutil.wait_procs(alive, timeout=5)
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


# ------------------------------------------------------------------ the workload
def _tiny_model(workdir: Path) -> Path:
    from elsa.tiny import save_tiny

    return save_tiny(workdir / "tiny-llama", "llama", seed=0)


def _run_workload(address: str, env: dict, workdir: Path) -> dict:
    """A real `elsa tune` search of 2 trials whose drivers ask for {"trainer": 1}.

    Each trial's driver needs the `trainer` resource that only the autoscaled worker type
    offers; its Ray Train worker takes 0.5 CPU, which only worker nodes have (the head has
    none). Returns the MLflow runs of the search: parent and children with their statuses.
    """
    import mlflow

    model = _tiny_model(workdir)
    db = workdir / "mlflow.db"
    command = [
        sys.executable,
        "-m",
        "cli",
        "tune",
        "--model",
        str(model),
        "--sparsity",
        "0.7",
        "--trials",
        "2",
        "--steps",
        "4",
        "--seqlen",
        "64",
        "--batch-size",
        "2",
        "--eval-interval",
        "2",
        "--val-blocks",
        "2",
        "--scheduler",
        "none",
        "--max-concurrent",
        "2",
        "--trial-resources",
        json.dumps({"CPU": 0.5, "trainer": 1}),
        "--cpus-per-worker",
        "0.5",
        "--address",
        address,
        "--storage-path",
        str(workdir / "storage"),
        "--name",
        "autoscale",
        "--tracking-uri",
        f"sqlite:///{db}",
        "--experiment",
        "autoscale",
        "--preset-out",
        str(workdir / "preset.yaml"),
    ]
    proc = subprocess.run(
        command,
        env={**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"elsa tune failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    )
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("autoscale").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    preset = workdir / "preset.yaml"
    return {
        "parents": parents,
        "children": children,
        "stdout": proc.stdout,
        "preset": yaml.safe_load(preset.read_text()) if preset.is_file() else None,
    }


_WHO_HOLDS = textwrap.dedent("""
    import sys
    from ray.util.state import list_actors
    for a in list_actors(address=sys.argv[1], filters=[("state", "=", "ALIVE")]):
        print(a.node_id, a.class_name, a.name, a.is_detached)
""")


def _alive_actors(head: LocalRayHead) -> str:
    """Alive actors and their nodes (what keeps a worker node from going idle), for a failure message."""
    proc = subprocess.run(
        [sys.executable, "-c", _WHO_HOLDS, head.dashboard_url],
        env=head.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.stdout[-3000:] or proc.stderr[-3000:]


def _monitor_log(head: LocalRayHead, chars: int = 4000) -> str:
    """The tail of the autoscaler's own log (why it did or did not launch a node), for a failure message."""
    logs = sorted((head.root / "ray").glob("session_latest/logs/monitor.*"))
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in logs) or "(no monitor log)"


# --------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_fake_cluster_scales_up_for_trainer_work_and_back_down(capsys):
    """Head with 0 CPUs + a worker type offering `trainer` (min 0, max 2, 6 s idle timeout):
    an `elsa tune` search whose trials ask for {"trainer": 1} must add worker nodes, finish
    with its MLflow runs, and the idle workers must be removed afterwards."""
    config = yaml.safe_load(FAKE_CONFIG.read_text())
    t0 = time.time()
    marks: dict[str, float] = {}
    head = LocalRayHead(num_cpus=0, autoscaling_config=config)
    # Point the fake workers at this head's port (they would dial <ip>:6379 otherwise).
    config["provider"]["gcs_address"] = head.address
    timeline = None
    with head:
        marks["head started"] = time.time()
        try:
            timeline = NodeTimeline(head)
            first = timeline.wait_for(lambda s: True, 60, "the first node sample")
            assert first["workers"] == [], f"workers alive before any work: {first}"
            head_id = first["head"][0]

            marks["work submitted"] = time.time()
            results = _run_workload(head.address, head.env, head.root)
            marks["work finished"] = time.time()
            during = [s for s in timeline.samples if marks["work submitted"] <= s["t"] <= marks["work finished"]]
            seen_workers = {w for s in during for w in s["workers"]}
            max_alive = max((len(s["workers"]) for s in during), default=0)

            try:
                timeline.wait_for(
                    lambda s: s["workers"] == [], SCALE_DOWN_TIMEOUT_S, "the idle worker nodes to be removed"
                )
            except TimeoutError as err:
                raise AssertionError(
                    f"{err}; alive actors (node id, class, name, detached):\n{_alive_actors(head)}"
                ) from None
            marks["back to head only"] = time.time()

            # elsa prune waits (bounded) for a node that holds its worker; the autoscaler adds one
            prune = _prune_on(head, _tiny_model(head.root), head.root / "prune", ["--resource-timeout", "300"])
            prune_log = (
                "" if prune.returncode == 0 else f"{prune.stdout[-3000:]}\n{prune.stderr[-3000:]}\n{_monitor_log(head)}"
            )
            marks["prune finished"] = time.time()
            during_prune = [s for s in timeline.samples if marks["back to head only"] <= s["t"]]
        finally:
            if timeline is not None:
                timeline.close()
                with capsys.disabled():
                    print(f"\nnode timeline (fake autoscaling cluster, head {head.address}):")
                    print(timeline.render(t0, marks))

    assert head.leftover == [], f"processes left running: {head.leftover}"
    assert max_alive >= 1, "no worker node was added while the work ran"
    assert seen_workers and head_id not in seen_workers
    assert len(results["parents"]) == 1 and len(results["children"]) == 2, results["stdout"][-2000:]
    assert all(r.info.status == "FINISHED" for r in results["children"]), [r.info.status for r in results["children"]]
    assert all("val_loss_projected" in r.data.metrics for r in results["children"])
    # the head holds no trial: the search waited (asking the autoscaler) for one trial's driver and worker
    wanted = "for the Ray cluster to provide 1 x {CPU: 0.5, trainer: 1} + 1 x {CPU: 0.5}"
    assert wanted in results["stdout"], results["stdout"][-3000:]
    entries = (results["preset"] or {}).get("presets") or []
    assert [e["sparsity"] for e in entries] == [0.7], results["preset"]
    assert entries[0]["config"].get("penalty") in ("coupled", "decoupled"), entries[0]
    assert prune.returncode == 0, prune_log
    assert "waiting up to 300 s (--resource-timeout)" in prune.stdout, prune.stdout[-3000:]
    assert any(s["workers"] for s in during_prune), "no worker node was added for the waiting prune run"
    with capsys.disabled():
        print(
            f"  max alive workers during the work: {max_alive}; "
            f"scale-down took {marks['back to head only'] - marks['work finished']:.1f}s "
            f"after the work finished"
        )


_JOB_QUERY = textwrap.dedent("""
    import json, sys
    from ray.job_submission import JobSubmissionClient
    client = JobSubmissionClient(sys.argv[1])
    print(json.dumps({"status": str(client.get_job_status(sys.argv[2]).value),
                      "logs": client.get_job_logs(sys.argv[2])}))
""")


def _job_entrypoint(model: Path, out_dir: Path) -> list[str]:
    """`elsa prune` as `ray job submit` runs it: a tiny model, 2 steps, no evaluation."""
    return [
        "python",
        "-m",
        "cli",
        "prune",
        "--model",
        str(model),
        "--sparsity",
        "0.5",
        "--steps",
        "2",
        "--seqlen",
        "64",
        "--batch-size",
        "2",
        "--val-blocks",
        "2",
        "--output",
        str(out_dir / "pruned"),
        "--tracking-uri",
        f"sqlite:///{out_dir / 'mlflow.db'}",
        "--experiment",
        "job-submit",
        "--storage-path",
        str(out_dir / "storage"),
        "--no-eval",
    ]


def _prune_on(head: LocalRayHead, model: Path, out_dir: Path, extra: list[str]) -> subprocess.CompletedProcess:
    """`elsa prune` of the tiny model as a driver that joins ``head`` (1 CPU per worker)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = _job_entrypoint(model, out_dir)
    command[:3] = [sys.executable, "-m", "cli"]
    command += ["--address", head.address, "--cpus-per-worker", "1", *extra]
    env = {**head.env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(command, env=env, cwd=out_dir, capture_output=True, text=True, timeout=600)


def test_ray_job_submit_runs_elsa_prune():
    if (err := _dashboard_deps_error()) is not None:
        pytest.skip(f"`ray job submit` needs the dashboard (pip install 'ray[default]'): {err}")
    work = Path(tempfile.mkdtemp(prefix="elsa-job-"))
    (work / "wd").mkdir()
    (work / "out").mkdir()
    (work / "wd" / "README.txt").write_text("shipped working directory\n")
    model = _tiny_model(work)
    job_id = f"elsa-test-{secrets.token_hex(4)}"
    try:
        with LocalRayHead(num_cpus=1) as head:
            head.wait_for_dashboard()
            # Token auth is on: the job API refuses a request without the token.
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{head.dashboard_url}/api/jobs/", timeout=10)
            assert refused.value.code in (401, 403)
            ray_job = RAY_CLI + ["job"]
            t = time.time()
            submit = subprocess.run(
                ray_job
                + [
                    "submit",
                    "--address",
                    head.dashboard_url,
                    "--submission-id",
                    job_id,
                    "--working-dir",
                    str(work / "wd"),
                    "--",
                ]
                + _job_entrypoint(model, work / "out"),
                env=head.env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            took = time.time() - t
            query = subprocess.run(
                [sys.executable, "-c", _JOB_QUERY, head.dashboard_url, job_id],
                env=head.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            # 2 workers of 1 CPU on a 1-CPU cluster without an autoscaler: a bounded wait, then exit 1
            t = time.time()
            starved = _prune_on(head, model, work / "starved", ["--workers", "2", "--resource-timeout", "3"])
            starved_s = time.time() - t
        assert head.leftover == [], f"processes left running: {head.leftover}"
        assert starved.returncode == 1, f"{starved.stdout[-2000:]}\n{starved.stderr[-3000:]}"
        assert "--resource-timeout 3 s" in starved.stderr and "2 x {CPU: 1}" in starved.stderr, starved.stderr
        assert "waiting up to 3 s" in starved.stdout and starved_s < 90
        assert not (work / "starved" / "mlflow.db").exists()  # refused before the MLflow run
        assert submit.returncode == 0, f"{submit.stdout[-2000:]}\n{submit.stderr[-3000:]}"
        assert query.returncode == 0, query.stderr[-3000:]
        info = json.loads(query.stdout.strip().splitlines()[-1])
        assert info["status"] == "SUCCEEDED", info
        assert "run id" in info["logs"], info["logs"][-2000:]
        import mlflow

        from elsa.model_io.export import load_checkpoint
        from run_levels import assert_matrix_sparsity, run_levels

        pruned, _ = load_checkpoint(work / "out" / "pruned")  # compressed: the default at sparsity 0.5
        assert_matrix_sparsity(pruned, run_levels(model, sparsity=0.5, seqlen=64))
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'out' / 'mlflow.db'}")
        (run,) = client.search_runs([client.get_experiment_by_name("job-submit").experiment_id])
        assert run.info.status == "FINISHED" and run.data.metrics["overall_sparsity"] > 0.49
        assert "checkpoint" in {a.path for a in client.list_artifacts(run.info.run_id)}
        print(f"\nray job submit -> SUCCEEDED in {took:.1f}s; elsa prune run {run.info.run_id}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
