"""A search survives a lost node: on the fake autoscaling cluster (tests/ray_cluster.py), a worker
node running a trial is killed mid-trial; the trial starts again (``--trial-retries``, default 1),
the search finishes, and MLflow accounts for every trial and for the lost attempt."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

psutil = pytest.importorskip("psutil")
pytest.importorskip("ray")

from ray_cluster import (  # noqa: E402  (after the importorskips: it needs psutil and Ray)
    OFFLINE,
    NodeTimeline,
    autoscaling_head,
    kill_all,
    search_runs,
    tiny_model,
    tune_command,
)

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(os, "getsid"), reason="needs POSIX sessions"),
]

STEPS = 40  # long enough that the kill lands mid-trial on this machine's 2 cores
TRAIN_WORKER = "RayTrainWorker"  # the process title of a Ray Train worker ("ray::RayTrainWorker...")


def _trial_raylet(head) -> psutil.Process | None:
    """The raylet of a worker node that runs a trial's Ray Train worker (the head has no CPUs, so
    never the head's)."""
    for proc in head.session_processes(owned_only=False):
        try:
            if TRAIN_WORKER not in " ".join(proc.cmdline()):
                continue
            return next((p for p in proc.parents() if p.name() == "raylet"), None)
        except psutil.Error:
            continue
    return None


def _node_id(raylet: psutil.Process) -> str:
    return next(arg.split("=", 1)[1] for arg in raylet.cmdline() if arg.startswith("--node_id="))


def _kill_node(raylet: psutil.Process) -> None:
    """SIGKILL the raylet and every process under it: the node is gone, as when a VM is lost."""
    kill_all([raylet, *raylet.children(recursive=True)], timeout=10)


def _trained(workdir) -> bool:
    """Both trials have logged a training step to MLflow (mid-run, not starting)."""
    try:
        _, children = search_runs(workdir, "node-loss")
    except Exception:  # the store is being created or written: ask again
        return False
    # both trials (the search has two): then whichever node is killed, its trial had logged a step
    return len(children) == 2 and all("train_loss" in run.data.metrics for run in children)


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"elsa tune ended (rc={proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_a_search_finishes_when_a_node_running_a_trial_is_lost(capsys, tmp_path):
    t0 = time.time()
    marks: dict[str, float] = {}
    head = autoscaling_head()
    workdir = tmp_path  # the search's storage and MLflow store outlive the cluster
    proc = None
    with head:
        timeline = NodeTimeline(head)
        try:
            command = tune_command(tiny_model(workdir), head.address, workdir, "node-loss", ["--steps", str(STEPS)])
            proc = subprocess.Popen(
                command,
                env={**head.env, **OFFLINE},
                cwd=workdir,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            _wait(lambda: _trained(workdir), 400, "both trials' first logged steps", proc)
            raylet = _wait(lambda: _trial_raylet(head), 60, "the raylet of a node running a trial", proc)
            lost = _node_id(raylet)
            _kill_node(raylet)
            marks[f"node {lost[:8]} killed"] = killed = time.time()
            out, _ = proc.communicate(timeout=600)
            marks["search finished"] = time.time()
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
            timeline.close()
            with capsys.disabled():
                print(f"\nnode timeline (fake autoscaling cluster, a node lost mid-trial, head {head.address}):")
                print(timeline.render(t0, marks))

    assert proc.returncode == 0, out[-4000:]
    assert head.leftover == [], f"processes left running: {head.leftover}"
    after = [s for s in timeline.samples if s["t"] > killed]
    assert any(lost not in s["workers"] for s in after), "the killed node never left the cluster"
    parents, children = search_runs(workdir, "node-loss")
    assert len(parents) == 1 and len(children) == 2, out[-3000:]
    assert [r.info.status for r in children] == ["FINISHED", "FINISHED"], out[-3000:]
    assert all("val_loss_projected" in r.data.metrics for r in children)
    # a trial's driver and its Ray Train worker may sit on different nodes: one lost node can cut
    # off one trial or both; each one cut off ran again, its run says why the first attempt ended
    retried = [r for r in children if r.data.tags.get("attempts") == "2"]
    assert retried, [r.data.tags.get("attempts") for r in children]
    assert all(r.data.tags.get("attempts") in ("1", "2") for r in children)
    assert all(r.data.tags.get("attempt_1_error") for r in retried), [r.data.tags for r in retried]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    histories = [client.get_metric_history(r.info.run_id, "train_loss") for r in retried]
    before = [m for history in histories for m in history if m.timestamp / 1000 < killed]
    assert before, "no retried trial had logged a step before the node was lost"
    assert all(max(m.step for m in history) == STEPS for history in histories)  # each attempt 2 ran to the end
    with capsys.disabled():
        print(
            f"  {len(retried)} trial(s) ran again; they had logged {len(before)} steps before the kill; "
            f"the search took {time.time() - t0:.0f} s"
        )
