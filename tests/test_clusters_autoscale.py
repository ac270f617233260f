"""Real local Ray clusters (tests/ray_cluster.py): autoscaling with Ray's fake multi-node provider,
and `ray job submit`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

psutil = pytest.importorskip("psutil")
pytest.importorskip("ray")

from ray_cluster import (  # noqa: E402  (after the importorskips: it needs psutil and Ray)
    OFFLINE,
    RAY_CLI,
    LocalRayHead,
    NodeTimeline,
    alive_actors,
    autoscaling_head,
    dashboard_deps_error,
    monitor_log,
    search_runs,
    tiny_model,
    tune_command,
)

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not hasattr(os, "getsid"), reason="needs POSIX sessions"),
]

SCALE_DOWN_TIMEOUT_S = 120


def _run_workload(address: str, env: dict, workdir: Path) -> dict:
    """A real `elsa tune` search of 2 trials of 4 steps whose drivers ask for {"trainer": 1}.

    Only the autoscaled worker type offers `trainer`, and the head has no CPUs: the trials run on
    worker nodes the autoscaler adds. Returns the search's MLflow runs (parent, children), its
    stdout and the preset file it wrote.
    """
    preset = workdir / "preset.yaml"
    extra = ["--steps", "4", "--eval-interval", "2", "--preset-out", str(preset)]
    command = tune_command(tiny_model(workdir), address, workdir, "autoscale", extra)
    proc = subprocess.run(command, env={**env, **OFFLINE}, cwd=workdir, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"elsa tune failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    )
    parents, children = search_runs(workdir, "autoscale")
    return {
        "parents": parents,
        "children": children,
        "stdout": proc.stdout,
        "preset": yaml.safe_load(preset.read_text()) if preset.is_file() else None,
    }


# --------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_fake_cluster_scales_up_for_trainer_work_and_back_down(capsys):
    """Head with 0 CPUs + a worker type offering `trainer` (min 0, max 2, 6 s idle timeout):
    an `elsa tune` search whose trials ask for {"trainer": 1} must add worker nodes, finish
    with its MLflow runs, and the idle workers must be removed afterwards."""
    t0 = time.time()
    marks: dict[str, float] = {}
    head = autoscaling_head()
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
                    f"{err}; alive actors (node id, class, name, detached):\n{alive_actors(head)}"
                ) from None
            marks["back to head only"] = time.time()

            # elsa prune waits (bounded) for a node that holds its worker; the autoscaler adds one
            prune = _prune_on(head, tiny_model(head.root), head.root / "prune", ["--resource-timeout", "300"])
            prune_log = (
                "" if prune.returncode == 0 else f"{prune.stdout[-3000:]}\n{prune.stderr[-3000:]}\n{monitor_log(head)}"
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
    # the best trial's settings, or none where the rule's own seed won (it fills them in at any budget)
    assert entries[0]["config"].get("penalty", "decoupled") in ("coupled", "decoupled"), entries[0]
    assert entries[0]["trial_id"] and (entries[0]["config"] or entries[0].get("best_seed") == "rule"), entries[0]
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
    env = {**head.env, **OFFLINE}
    return subprocess.run(command, env=env, cwd=out_dir, capture_output=True, text=True, timeout=600)


def test_ray_job_submit_runs_elsa_prune():
    if (err := dashboard_deps_error()) is not None:
        pytest.skip(f"`ray job submit` needs the dashboard (pip install 'ray[default]'): {err}")
    work = Path(tempfile.mkdtemp(prefix="elsa-job-"))
    (work / "wd").mkdir()
    (work / "out").mkdir()
    (work / "wd" / "README.txt").write_text("shipped working directory\n")
    model = tiny_model(work)
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
