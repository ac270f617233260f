"""Shared warm starts in a search (tune/starts.py): a trial begins from a start pruned with its own
start settings. Unit tests of the grouping, then a real search on the tiny model whose two trials
sample different OWL allocations and must each load the start of theirs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from tune_helpers import tiny_search, tune_runs, write_space
from tune.space import parse_space
from tune.starts import MAX_STARTS, start_variants, trial_start_key, variant_key


def test_one_start_when_no_start_setting_is_searched():
    space = parse_space({"lr": {"loguniform": [1e-4, 1e-3]}, "allocation": "uniform"})  # fixed: one start
    assert start_variants(space) == [{}] and variant_key({}) == ""
    assert trial_start_key(space, {"lr": 3e-4}) == ""


def test_one_start_per_combination_of_searched_choices():
    space = parse_space(
        {
            "lr": {"loguniform": [1e-4, 1e-3]},
            "allocation": {"choice": ["owl", "uniform"]},
            "owl_lambda": {"choice": [0.04, 0.08]},
        }
    )
    variants = start_variants(space)
    assert len(variants) == 4 <= MAX_STARTS
    keys = {variant_key(v) for v in variants}
    assert "allocation=uniform,owl_lambda=0.04" in keys and len(keys) == 4
    sample = {"lr": 2e-4, "owl_lambda": 0.08, "allocation": "owl"}
    assert trial_start_key(space, sample) == "allocation=owl,owl_lambda=0.08" and trial_start_key(space, sample) in keys


@pytest.mark.parametrize(
    "dims",
    [
        {"owl_lambda": {"uniform": [0.02, 0.1]}},  # a range: every value its own start
        {"owl_lambda": {"choice": [0.02, 0.04, 0.06]}, "allocation": {"choice": ["owl", "uniform"]}},  # 6 > 4
    ],
)
def test_trials_compute_their_own_starts_when_they_cannot_share(dims):
    assert start_variants(parse_space({"lr": {"loguniform": [1e-4, 1e-3]}, **dims})) is None


def test_the_rules_setting_is_seeded_from_every_shared_start():
    """A space searching OWL against uniform evaluates the rule's setting from both starts first
    (the start question answered at equal settings), then the sampled trials."""
    from tune.seed import RULE, seed_points

    base = {"steps": 64, "allocation": "owl", "rho": 0.005, "rho_final": 0.05, "rho_schedule": "linear"}
    space = parse_space({"lr": {"loguniform": [1e-5, 1e-2]}, "allocation": {"choice": ["uniform", "owl"]}})
    rule, other = seed_points(space, base, "m", 0.8, median_rms=0.0395)
    assert (rule.kind, other.kind) == (RULE, "rule/allocation:uniform")
    assert rule.point == {"lr": 1.2e-4, "allocation": "owl"} and other.point == {"lr": 1.2e-4, "allocation": "uniform"}
    assert other.source == "rule:steps=64,allocation=uniform"
    two = parse_space({"allocation": {"choice": ["owl", "uniform"]}, "owl_lambda": {"choice": [0.04, 0.08]}})
    kinds = [seed.kind for seed in seed_points(two, {**base, "owl_lambda": 0.08}, "m", 0.8, None)]
    assert kinds == [RULE, "rule/allocation:owl/owl_lambda:0.04", "rule/allocation:uniform/owl_lambda:0.04"] + [
        "rule/allocation:uniform/owl_lambda:0.08"
    ]
    assert len(seed_points(parse_space({"lr": {"loguniform": [1e-5, 1e-2]}}), base, "m", 0.8, 0.19)) == 1


@pytest.mark.parametrize(
    ("seed", "kept"),
    [("rule", {}), ("rule/allocation:uniform", {"allocation": "uniform"}), ("", {"lr": 2e-4, "allocation": "uniform"})],
)
def test_a_rule_seeds_preset_keeps_only_what_it_changed(seed, kept):
    """The rule's seed is the rule at the trial budget (its interval, rho schedule): a preset from it
    holds only the seed's own changes, so `elsa prune --preset` at another budget runs that
    budget's rule; a sampled winner's preset holds every searched value."""
    from tune.results import SparsityOutcome, TrialRow, preset_entry

    space = parse_space({"lr": {"loguniform": [1e-5, 1e-2]}, "allocation": {"choice": ["owl", "uniform"]}})
    best = TrialRow("t1", {"lr": 2e-4, "allocation": "uniform"}, 4.8, 64, "completed", "run1", seed)
    outcome = SparsityOutcome(0.8, "parent", "/exp", rows=[best], best=best, seeds=[best] if seed else [])
    entry = preset_entry("m", outcome, space, {"steps": 64, "allocation": "owl"}, "s")
    assert entry["config"] == kept and entry.get("best_seed", "") == seed
    assert entry["val_loss_projected"] == 4.8 and entry["trial_id"] == "t1"


@pytest.mark.parametrize("init", ["none", "sparsegpt"])
def test_where_the_starts_live_and_none_without_a_start(tmp_path, init):
    """Without a start (init: none) a search shares none and writes none; with one, the single
    start keeps its folder of before (a resumed search finds it) and variants live beneath it."""
    from types import SimpleNamespace

    from tune import one_sparsity

    base = {"model": "smollm2-135m", "sparsity": 0.8, "init": init, "steps": 4}
    single = SimpleNamespace(space=parse_space({"lr": {"loguniform": [1e-4, 1e-3]}}), root=str(tmp_path))
    varied = SimpleNamespace(space=parse_space({"allocation": {"choice": ["owl", "uniform"]}}), root=str(tmp_path))
    if init == "none":
        assert one_sparsity._shared_start(single, base, 0.8, "parent") is None
        assert one_sparsity._start_locations(varied, base, 0.8) is None
        assert not any(tmp_path.iterdir())
        return
    folder = str(tmp_path / "init" / "sparsity-0.8")
    assert one_sparsity._start_locations(single, base, 0.8) == {"": folder}
    assert one_sparsity._start_locations(varied, base, 0.8) == {
        "allocation=owl": f"{folder}/allocation=owl",
        "allocation=uniform": f"{folder}/allocation=uniform",
    }


@pytest.mark.ray
@pytest.mark.slow
def test_each_trial_loads_the_start_of_its_own_allocation(tmp_path, tiny_model_dir, ray_session, fast_reports):
    # Two trials, deterministic: the budget rule's setting (allocation owl), then the same from
    # the uniform start (tune/seed.py). Before tune/starts.py both loaded one OWL start.
    space = write_space(
        tmp_path / "space.yaml",
        {"allocation": {"choice": ["uniform", "owl"]}, "lr": {"loguniform": [1e-5, 1e-2]}, "penalty": "decoupled"},
    )
    report = tiny_search(
        tmp_path,
        tiny_model_dir,
        ["--sparsity", "0.8", "--trials", "2", "--steps", "2", "--eval-interval", "1", "--space", space]
        + ["--scheduler", "none", "--name", "starts"],
    )
    (outcome,) = report.outcomes
    seeds = {row.seed: row.sample for row in outcome.rows}
    assert set(seeds) == {"rule", "rule/allocation:uniform"}
    assert (seeds["rule"]["allocation"], seeds["rule/allocation:uniform"]["allocation"]) == ("owl", "uniform")
    assert seeds["rule"]["lr"] == seeds["rule/allocation:uniform"]["lr"]  # equal settings, two starts
    folder = Path(report.root) / "init" / "sparsity-0.8"
    owl, uniform = folder / "allocation=owl", folder / "allocation=uniform"
    assert (owl / "config.json").is_file() and (uniform / "config.json").is_file()
    assert (owl / "sparsity_map.json").is_file() and not (uniform / "sparsity_map.json").exists()

    client, runs = tune_runs(report.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.metrics["init_s/allocation:owl"] > 0 and parent.data.metrics["init_s/allocation:uniform"] > 0
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    start_loss = {r.data.params["allocation"]: r.data.metrics["init_val_loss"] for r in children}
    assert set(start_loss) == {"owl", "uniform"}
    assert start_loss["owl"] != start_loss["uniform"]  # two different starts were loaded


def test_a_searched_loss_seeds_the_rule_with_each_loss():
    """``loss: {choice: [ntp, ntp+kd]}`` evaluates the rule's setting with both losses first, so the
    search answers "does distillation pay at this budget" at equal settings; a preset from the
    distilled rule seed keeps only the loss (the rest is the rule's at the prune's budget)."""
    from tune.results import kept_keys
    from tune.seed import RULE, seed_points

    base = {"steps": 300, "loss": "ntp", "allocation": "owl", "rho": 0.005, "rho_final": 0.05}
    space = parse_space({"lr": {"loguniform": [1e-4, 1e-3]}, "loss": {"choice": ["ntp", "ntp+kd"]}})
    rule, kd = seed_points(space, base, "m", 0.8, median_rms=0.19)
    assert (rule.kind, kd.kind) == (RULE, "rule/loss:ntp+kd") and kd.source == "rule:steps=300,loss=ntp+kd"
    assert rule.point == {"lr": 6e-4, "loss": "ntp"} and kd.point == {"lr": 6e-4, "loss": "ntp+kd"}
    long_rule, ntp = seed_points(space, {**base, "steps": 1100, "loss": "ntp+kd"}, "m", 0.8, median_rms=0.19)
    assert (long_rule.point["loss"], ntp.kind) == ("ntp+kd", "rule/loss:ntp")  # from 1,000 steps the rule distils
    best = SimpleNamespace(seed=kd.kind)
    assert kept_keys(best, {"lr": 6e-4, "loss": "ntp+kd"}) == {"loss"}


def test_a_seed_kind_mlflow_refuses_in_a_key_reaches_the_parent_run_spelled_out(tmp_path):
    """The distilled rule seed's kind has a ``+``, which MLflow refuses in a key, rejecting the whole
    batch (a real search failed so twice on 2026-12-07): its parameters and the search's closing tags
    reach the run under a key with ``_`` for the ``+``, every value kept."""
    import mlflow
    from mlflow.entities import Param

    from pipelines.records import tracking
    from tune import runs
    from tune.one_sparsity import _seed_params
    from tune.seed import seed_points

    base = {"steps": 300, "loss": "ntp", "allocation": "owl", "rho": 0.005, "rho_final": 0.05}
    space = parse_space({"loss": {"choice": ["ntp", "ntp+kd"]}})
    params = _seed_params(seed_points(space, base, "m", 0.8, median_rms=0.19))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("seeds")).info.run_id
    with pytest.raises(mlflow.exceptions.MlflowException, match="Names may only contain"):
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    tracking.log_params(uri, run_id, params)
    logged = client.get_run(run_id).data.params
    assert len(logged) == len(params) and logged["seed.rule.loss"] == "ntp"
    assert logged["seed.rule/loss:ntp_kd.loss"] == "ntp+kd"
    assert logged["seed.rule/loss:ntp_kd.source"] == "rule:steps=300,loss=ntp+kd"
    runs.finish(uri, run_id, "FINISHED", {"seed_rule/loss:ntp+kd_source": "rule:steps=300,loss=ntp+kd"})
    finished = client.get_run(run_id)  # the search's closing tags, as tune/one_sparsity.py sets them
    assert finished.info.status == "FINISHED"
    assert finished.data.tags["seed_rule/loss:ntp_kd_source"] == "rule:steps=300,loss=ntp+kd"
