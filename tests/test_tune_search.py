"""`elsa tune`, real searches: Ray Tune over the pipeline's Ray Train job, Optuna, ASHA, MLflow
parent/child runs in a sqlite store, presets, resume, NaN trials, on the tiny local model; each
trial is a few steps of seqlen 32, so most of the time is actor start-up."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from cli.main import make_parser
from pipelines.cli import build_config
from tune.search import NONFINITE_LOSS
from tune_helpers import no_leaked_actors, tiny_search, tune_runs, write_space


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Fixed parameter lr")  # the seed lies outside the absurd range on purpose
def test_search_stops_bad_trials_tracks_them_and_writes_a_preset(tmp_path, tiny_model_dir, ray_session, fast_reports):
    # lr in [0.5, 2] is absurd for Adam (the loss jumps to 10-60 after one step), while the two
    # seeds, the budget rule's setting and then Table 5's (OPT-125M at 80%: lr 2e-4, lambda 1e-3),
    # are evaluated first as they are, outside the range. With grace period 1 and reduction
    # factor 2, ASHA must stop every absurd trial at its first report; --max-val-loss is raised
    # so that ASHA, not the divergence stopper, does it.
    space = write_space(
        tmp_path / "space.yaml",
        {
            "lr": {"loguniform": [0.5, 2.0]},
            "lmda": {"loguniform": [1e-4, 1e-2]},
            "lmda_schedule": {"choice": ["constant", "cosine"]},
            "penalty": {"choice": ["coupled", "decoupled"]},
            "rho": {"loguniform": [1e-3, 0.3]},
            "rho_schedule": {"choice": ["constant", "linear"]},
        },
    )
    started = time.perf_counter()
    report = tiny_search(
        tmp_path,
        tiny_model_dir,
        [
            "--sparsity",
            "0.8",
            "--trials",
            "3",
            "--steps",
            "4",
            "--eval-interval",
            "1",
            "--space",
            space,
            "--grace-period",
            "1",
            "--reduction-factor",
            "2",
            "--max-val-loss",
            "1e4",
            "--name",
            "asha",
        ],
    )
    print(f"3-trial search: {time.perf_counter() - started:.1f} s")
    (outcome,) = report.outcomes
    assert not report.interrupted and len(outcome.rows) == 3

    rule, seed = outcome.rows[:2]  # the first trials: the budget rule's setting, then Table 5's
    assert rule.seed == "rule" and rule.sample["penalty"] == "decoupled" and rule.sample["rho"] == 0.05
    assert rule.sample["lr"] < 0.5 and rule.outcome == "completed"  # the rule's lr, outside the absurd range
    assert seed.seed == "paper" and outcome.seed_sources["paper"] == "paper:facebook/opt-125m@0.8"
    assert seed.sample["lr"] == 2e-4 and seed.sample["lmda"] == 1e-3
    assert seed.sample["lmda_schedule"] == "constant" and seed.sample["penalty"] == "coupled"
    assert seed.outcome == "completed" and seed.step == 4
    stopped = [row for row in outcome.rows if row.outcome == "stopped_early"]
    assert stopped and all(row.step < 4 for row in stopped)
    assert all(0.5 <= row.sample["lr"] <= 2.0 for row in outcome.rows[2:])
    assert outcome.best is not None and outcome.best.val_loss_projected == min(
        r.val_loss_projected for r in outcome.rows if r.outcome == "completed"
    )

    # MLflow: one parent with the space and the seed, one child per trial, closed with the right status
    client, runs = tune_runs(report.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["seed.paper.lr"] == "0.0002" and parent.data.params["space.lr"].startswith("loguniform")
    assert parent.data.params["seed.rule.source"] == "rule:steps=4"
    assert parent.data.metrics["seed_rule_val_loss_projected"] == pytest.approx(rule.val_loss_projected)
    assert parent.data.metrics["trials_stopped_early"] == len(stopped)
    children = {r.data.tags["trial_id"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {row.trial_id for row in outcome.rows}
    for row in outcome.rows:
        child = children[row.trial_id]
        if row.outcome == "stopped_early":
            assert child.info.status == "KILLED" and child.data.tags["stopped_early"] == "true"
        else:
            assert child.info.status == "FINISHED"
        assert "val_loss_projected" in child.data.metrics and child.data.params["sparsity"] == "0.8"
    history = client.get_metric_history(children[seed.trial_id].info.run_id, "val_loss_projected")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    # the budget rule's SparseGPT start is computed once for the sparsity, not in every trial
    assert (Path(report.root) / "init" / "sparsity-0.8" / "config.json").is_file()
    assert parent.data.metrics["init_s"] > 0
    assert not any("init_s" in child.data.metrics for child in children.values())

    # the best configuration as a preset file, logged to the parent, read by `elsa prune --preset`
    preset = Path(report.preset_file)
    entry = yaml.safe_load(preset.read_text())["presets"][0]
    assert (
        entry["trial_id"] == outcome.best.trial_id and entry["mlflow_run_id"] == children[entry["trial_id"]].info.run_id
    )
    assert entry["val_loss_projected"] == pytest.approx(outcome.best.val_loss_projected)
    assert preset.name in [a.path for a in client.list_artifacts(parent.info.run_id)]
    cfg = build_config(
        make_parser().parse_args(
            ["prune", "--model", str(tiny_model_dir), "--sparsity", "0.8", "--preset", str(preset)]
        )
    )
    for key, value in entry["config"].items():
        assert getattr(cfg, key) == value
    assert cfg.preset.startswith(preset.name)
    if outcome.best.seed == "rule":  # the rule at the trial budget: the preset keeps nothing, the rule fills in
        assert entry["config"] == {} and entry["best_seed"] == "rule" and cfg.lr is None
    else:
        assert cfg.lr == outcome.best.sample["lr"] and entry.get("best_seed") in (None, "paper")
    assert no_leaked_actors(ray_session)


@pytest.mark.ray
@pytest.mark.slow
def test_nonfinite_trial_is_stopped_and_marked_not_crashed(tmp_path, tiny_model_dir, ray_session, fast_reports):
    # lr 1e30 makes the weights inf after one step, so the training loss of step 2 is NaN and the
    # worker loop raises NonFiniteLossError (no evaluation runs before it: eval_interval = steps).
    space = write_space(tmp_path / "space.yaml", {"lr": {"choice": [1e30]}, "lmda": {"loguniform": [1e-4, 1e-2]}})
    report = tiny_search(
        tmp_path,
        tiny_model_dir,
        [
            "--sparsity",
            "0.7",
            "--trials",
            "2",
            "--steps",
            "3",
            "--eval-interval",
            "3",
            "--space",
            space,
            "--name",
            "nan",
            "--max-concurrent",
            "2",
        ],
    )
    (outcome,) = report.outcomes
    assert [row.outcome for row in outcome.rows] == ["nonfinite_loss", "nonfinite_loss"]  # the search went on
    assert all(row.val_loss_projected == NONFINITE_LOSS and row.step == 2 for row in outcome.rows)
    assert outcome.best is None and report.preset_file is None
    client, runs = tune_runs(report.tracking_uri)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == outcome.parent_run_id]
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FAILED" and child.data.tags["nonfinite_loss"] == "true"
        assert "at step 2" in child.data.tags["error"]
    assert client.get_run(outcome.parent_run_id).data.metrics["trials_diverged"] == 2


def _interrupt_after(count: int, marker: Path):
    """A Tune callback that sends the search SIGUSR1 (Tune's graceful stop, as Ctrl+C) once ``count``
    trials have ended. Once only (``marker``): Tune saves its callbacks with the experiment, so the
    resumed search runs this callback again."""
    from ray import tune as ray_tune

    class Interrupt(ray_tune.Callback):
        def __init__(self):
            self.done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            if self.done == count and not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGUSR1)

    return Interrupt()


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_search_resumes_without_rerunning_finished_trials(
    tmp_path, tiny_model_dir, ray_session, fast_reports
):
    from tune.cli import run_tune

    argv = [
        "--sparsity",
        "0.7",
        "--trials",
        "2",
        "--steps",
        "2",
        "--eval-interval",
        "1",
        "--scheduler",
        "none",
        "--name",
        "resume",
    ]
    first = tiny_search(tmp_path, tiny_model_dir, argv, extra_callbacks=[_interrupt_after(1, tmp_path / "interrupted")])
    assert first.interrupted and first.preset_file is None
    finished = {row.trial_id for row in first.outcomes[0].rows if row.outcome == "completed"}
    assert len(finished) == 1
    client, _ = tune_runs(first.tracking_uri)
    parent_id = first.outcomes[0].parent_run_id
    assert client.get_run(parent_id).info.status == "KILLED"

    common = [
        "--storage-path",
        str(tmp_path / "storage"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--name",
        "resume",
    ]
    with pytest.raises(Exception, match="already exists"):  # the same name without --resume is refused
        run_tune(make_parser().parse_args(["tune", "--model", str(tiny_model_dir), "--sparsity", "0.7", *common]))
    assert run_tune(make_parser().parse_args(["tune", "--resume", *common])) == 0

    _, runs = tune_runs(first.tracking_uri)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(children) == 2  # one run per trial: nothing was started twice as a new trial
    for child in children:
        assert child.info.status == "FINISHED"
        if child.data.tags["trial_id"] in finished:  # not rerun: one attempt, one value per step
            assert child.data.tags["attempts"] == "1"
            assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_loss_projected")) == [1, 2]
    assert client.get_run(parent_id).info.status == "FINISHED"
    trial_dirs = [
        d
        for d in (tmp_path / "storage" / "resume" / "sparsity-0.7").iterdir()
        if d.is_dir() and d.name.startswith("run_trial")
    ]
    assert len(trial_dirs) == 2
    preset = yaml.safe_load((tmp_path / "storage" / "resume" / "best_presets.yaml").read_text())["presets"]
    assert len(preset) == 1 and preset[0]["sparsity"] == 0.7 and math.isfinite(preset[0]["val_loss_projected"])
