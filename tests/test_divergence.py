"""A run whose finite loss explodes stops at that step: FAILED, one line, no export, good checkpoints kept."""

from __future__ import annotations

import json
import math

import pytest

from elsa.loop import DivergedError, DivergenceGuard, NonFiniteLossError


def test_guard_forgives_a_spike_and_stops_a_sustained_explosion():
    guard = DivergenceGuard()
    for step, loss in enumerate([6.0, 70.0, 6.5, 70.0, 70.0, 5.0], start=1):  # never 3 in a row above 60
        guard.check(step, loss)
    assert guard.healthy
    guard.check(7, 61.0)
    guard.check(8, 1e5)
    assert not guard.healthy
    with pytest.raises(DivergedError) as caught:
        guard.check(9, 1.3e8)
    message = str(caught.value)
    assert "step 9" in message and "1.3e+08" in message and "lower --lr or --rho" in message
    assert isinstance(caught.value, NonFiniteLossError)  # Tune's trials already treat it as divergence


def test_guard_stops_a_non_finite_projection():
    guard = DivergenceGuard()
    guard.check(1, 6.0, {"primal_residual": 0.5, "mask_change": 0.1})
    with pytest.raises(DivergedError, match="step 2.*primal_residual"):
        guard.check(2, 6.1, {"primal_residual": math.nan, "mask_change": 0.1})


def test_train_loop_stops_when_the_loss_explodes(tok):
    """The real loop on a tiny Llama at lr 1e3: loss 6.9 -> 2e7 -> ...; stopped at step 4, checkpoint of step 1 only."""
    from elsa.config import make_config
    from elsa.loop import BatchSampler, LoopHooks, build_admm, train
    from elsa.tiny import tiny_model

    cfg = make_config(
        {
            "model": "x",
            "sparsity": 0.7,
            "steps": 12,
            "seqlen": 32,
            "batch_size": 2,
            "interval": 2,
            "eval_interval": 100,
            "lr": 1e3,
            "val_blocks": 1,
            "checkpoint_interval": 1,
            "penalty": "coupled",
            "init": "none",
            "bf16": False,
        }
    )  # the settings this was measured with
    model = tiny_model("llama", len(tok))
    admm, scheduler = build_admm(model, cfg)
    checkpoints: list[int] = []
    hooks = LoopHooks(on_checkpoint=checkpoints.append)
    with pytest.raises(DivergedError, match="step 4"):
        train(model, admm, scheduler, BatchSampler(tok, cfg), cfg, hooks)
    assert [h["step"] for h in hooks.history] == [1, 2, 3, 4]  # the diverging steps are logged
    assert hooks.history[-1]["train_loss"] > 10 * hooks.history[0]["train_loss"]
    assert checkpoints == [1]  # the exploded steps 2-3 wrote none: the step-1 checkpoint is the last good one


@pytest.mark.ray
@pytest.mark.slow
def test_exploding_run_ends_failed_without_export(tmp_path, tiny_model_dir, ray_session, monkeypatch, capsys):
    """elsa prune --lr 1e3 on Ray Train + sqlite MLflow: exit 1, one line naming step and fix, run FAILED, no model."""
    import mlflow

    from cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "pruned"
    rc = main(
        [
            "prune",
            "--model",
            str(tiny_model_dir),
            "--sparsity",
            "0.7",
            "--steps",
            "12",
            "--seqlen",
            "32",
            "--batch-size",
            "2",
            "--interval",
            "2",
            "--eval-interval",
            "100",
            "--lr",
            "1e3",
            "--val-blocks",
            "1",
            "--checkpoint-interval",
            "1",
            "--cpus-per-worker",
            "1",
            "--output",
            str(out),
            "--experiment",
            "diverge",
            "--no-eval",
            "--penalty",
            "coupled",
            "--init",
            "none",
            "--no-bf16",
        ]
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("elsa: error")]
    assert rc == 1, err[-3000:]
    assert len(lines) == 1 and "diverged at step 4" in lines[0] and "lower --lr or --rho" in lines[0], lines
    assert "Training failed due to worker errors" not in lines[0]
    assert not out.exists()  # nothing exported

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("diverge").experiment_id])
    assert run.info.status == "FAILED"
    assert "diverged at step 4" in run.data.tags["error"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4]
    states = sorted((tmp_path / "elsa-runs").rglob("elsa_state.json"))
    assert [json.loads(p.read_text())["step"] for p in states] == [1]  # the last good checkpoint is kept
