"""What a user gets from ``elsa prune``: what it prints, one copy of the model, a card, a registry version.

One real run (the CLI in a subprocess, stdout a pipe, its own local Ray, a sqlite MLflow store)
on a tiny Llama at 90%, read back by several tests.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BUDGET = [
    "--steps",
    "4",
    "--seqlen",
    "64",
    "--batch-size",
    "2",
    "--interval",
    "2",
    "--eval-interval",
    "2",
    "--lr",
    "1e-3",
    "--val-blocks",
    "2",
    "--eval-seqlen",
    "64",
    "--eval-max-windows",
    "4",
]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("publish")
    args = [
        "prune",
        "--model",
        str(tiny_model_dir),
        "--sparsity",
        "0.9",
        *BUDGET,
        "--output",
        "out",
        "--register",
        "tiny-elsa",
        "--experiment",
        "publish-test",
    ]
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = _run_timed([sys.executable, "-m", "cli", *args], work, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, proc


def _run_timed(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """Run ``command`` with stdout a pipe (not a TTY), noting when each line arrives (``proc.arrivals``:
    seconds since the start)."""
    import threading
    import time

    started = time.monotonic()
    child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.append(child.stderr.read()))
    reader.start()
    lines, arrivals = [], []
    for line in child.stdout:
        lines.append(line)
        arrivals.append(time.monotonic() - started)
    child.wait(timeout=900)
    reader.join()
    proc = subprocess.CompletedProcess(command, child.returncode, "".join(lines), "".join(errors))
    proc.arrivals = arrivals
    return proc


def _client(work: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")


def test_progress_lines_before_the_summary_and_no_library_noise(run):
    _, proc = run
    lines = proc.stdout.splitlines()
    summary = next(i for i, line in enumerate(lines) if line.startswith("run id"))
    progress = [i for i, line in enumerate(lines) if re.match(r"^step \d+/4 \(\d+%\)", line)]
    assert progress and progress[0] < summary, proc.stdout
    assert any(re.match(r"^step 4/4 .*loss [\d.]+.*primal [\d.]+", lines[i]) for i in progress), proc.stdout
    assert "\r" not in proc.stdout  # not a terminal: plain lines, no in-place rewriting
    everything = proc.stdout + proc.stderr
    noises = ("Failed to load", "PreemptionWatcher", "Token authentication", "deprecated", "Reporting training result")
    for noise in noises:
        assert noise not in everything, noise
    assert re.search(r"^export\s+compressed, float32, [\d.]+ MB of weights$", proc.stdout, re.M), proc.stdout


def test_first_line_within_seconds_and_never_silent_for_long(run):
    """Captured (not a TTY): the first line within 10 s of the command, then never 15 s without one."""
    _, proc = run
    gaps = [later - earlier for earlier, later in zip(proc.arrivals, proc.arrivals[1:])]
    assert proc.arrivals[0] <= 10.0, proc.stdout[:500]
    assert max(gaps) <= 15.0, (max(gaps), proc.stdout)
    assert re.search(r"^  \.\.\. .+ \(\d+s\)$", proc.stdout, re.M) or max(gaps) < 10.0  # what fills a silence


def test_exactly_one_copy_besides_the_output(run):
    work, _ = run
    weights = sorted(p.relative_to(work) for p in work.rglob("*.safetensors"))
    assert len(weights) == 2, weights
    assert sum(p.parts[0] == "out" for p in weights) == 1
    assert sum(p.parts[0] == "mlruns" for p in weights) == 1
    # the run's storage folder (Ray Train's checkpoints, the export) is gone; the MLflow journal
    # (pipelines.records.outbox, no weights) may stay beside it
    assert not list(work.glob("elsa-runs/elsa-*")) and not list(work.rglob("checkpoint_*"))


def test_card_has_results_and_is_the_logged_one(run):
    from elsa.model_io.export import load_checkpoint

    work, _ = run
    card = (work / "out" / "README.md").read_text()
    front = card.split("---")[1]
    assert "- sparse" in front and "- elsa" in front
    assert "ppl_wikitext2-bundled" in card and "Not evaluated yet" not in card
    assert "windows of 64 tokens, the first 4 windows" in card
    assert "elsa prune --model" in card and "--register tiny-elsa" in card
    client = _client(work)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("publish-test").experiment_id])
    logged = Path(client.download_artifacts(mlrun.info.run_id, "checkpoint/README.md", str(work / "dl")))
    assert logged.read_text() == card
    ppl = mlrun.data.metrics["ppl_wikitext2-bundled"]
    assert f"{ppl:.6g}" in card
    # the per-matrix levels of the run's allocation (OWL, the default), reusable as --sparsity-map
    levels = json.loads(
        Path(client.download_artifacts(mlrun.info.run_id, "sparsity_map.json", str(work / "dl"))).read_text()
    )
    assert len(set(levels.values())) > 1 and min(levels.values()) == mlrun.data.metrics["sparsity_min"]
    model, _ = load_checkpoint(work / "out")  # the shipped export loads
    assert json.loads((work / "out" / "config.json").read_text())["elsa_sparse"]["format"] == "elsa-bitmask"
    assert model.config.vocab_size > 0


def test_register_creates_a_model_version(run, capsys):
    from pipelines.records.compare import main as compare_main

    work, proc = run
    client = _client(work)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("publish-test").experiment_id])
    (version,) = client.search_model_versions("name='tiny-elsa'")
    assert version.run_id == mlrun.info.run_id and int(version.version) == 1
    assert version.tags["sparsity"] == "0.9"
    assert float(version.tags["ppl"]) == pytest.approx(mlrun.data.metrics["ppl_wikitext2-bundled"])
    assert version.source.endswith("/checkpoint")
    assert "registered  tiny-elsa v1" in proc.stdout
    compare_main("publish-test", f"sqlite:///{work / 'mlflow.db'}", work / "compare")
    printed = capsys.readouterr().out
    assert re.search(r"^tiny-elsa\s+1\s+0\.9\s+[\d.]+\s+compressed", printed, re.M), printed
