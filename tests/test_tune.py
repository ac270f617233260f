"""`elsa tune`, its pieces: spaces, the rule's and Table 5's seeds, searchers and schedulers, the
flags, trial resources, and searches refused before they start. The real searches are in
tests/test_tune_search.py."""

from __future__ import annotations


import pytest

from cli.main import make_parser
from pipelines.run.capacity import RESOURCE_TIMEOUT_S, bundles_fit, describe
from tune.search import NONFINITE_LOSS, diverged
from tune.space import SpaceError, load_space, parse_space, trial_config
from tune_helpers import tiny_search

# ----------------------------------------------------------------------------- without Ray


def test_paper_space_loads_and_maps_schedules():
    space = load_space("paper")
    assert {"lr", "lmda", "lmda_schedule", "penalty", "rho", "rho_schedule"} <= set(space.dimensions)
    base = {"lmda": 2e-3, "lmda_schedule": "constant", "penalty": "coupled"}
    cosine = space.overrides(
        {
            "lr": 1e-3,
            "lmda": 1e-2,
            "lmda_schedule": "cosine",
            "penalty": "coupled",
            "rho": 0.1,
            "rho_schedule": "linear",
        },
        base,
    )
    assert cosine["lmda"] == 0.0 and cosine["lmda_final"] == 1e-2 and cosine["lmda_schedule"] == "cosine"
    assert cosine["rho"] is None and cosine["rho_schedule"] == "constant"  # coupled: rho means nothing
    expo = space.overrides(
        {"lmda": 1e-2, "lmda_schedule": "exponential", "penalty": "decoupled", "rho": 0.1, "rho_schedule": "cosine"},
        base,
    )
    assert expo["lmda"] == pytest.approx(1e-3) and expo["lmda_final"] == 1e-2  # start_fraction 0.1
    assert expo["rho"] == pytest.approx(1e-2) and expo["rho_final"] == 0.1 and expo["rho_schedule"] == "cosine"
    constant = space.overrides(
        {"lmda": 5e-3, "lmda_schedule": "constant", "penalty": "decoupled", "rho": 0.05, "rho_schedule": "constant"},
        {**base, "lmda_final": 1.0},
    )
    cfg = trial_config({**base, "lmda_final": 1.0, "sparsity": 0.7, "model": "m"}, constant)
    assert (
        cfg.lmda == 5e-3 and cfg.lmda_final is None and cfg.rho == 0.05
    )  # a constant schedule clears the base's final value


@pytest.mark.parametrize(
    "space, needle",
    [
        ({"steps": {"choice": [1, 2]}}, "budget"),
        ({"lmda_final": {"loguniform": [1e-4, 1e-2]}}, "derived"),
        ({"lr": {"loguniform": [0, 1]}}, "low > 0"),
        ({"lr": {"normal": [0, 1]}}, "exactly one of"),
        ({"rho": {"loguniform": [1e-3, 2.0]}}, "inside (0, 1)"),
        ({"learning_rate": {"choice": [1]}}, "not a PruneConfig field"),
        ({"penalty": "coupled"}, "no field is searched"),
    ],
)
def test_bad_space_is_refused_with_the_reason(space, needle):
    with pytest.raises(SpaceError, match=None) as err:
        parse_space(space, "space.yaml")
    assert needle in str(err.value)


def test_seed_is_the_paper_setting_for_the_nearest_model():
    from tune.seed import paper_seed

    space = load_space("paper")
    seed = paper_seed(space, "meta-llama/Llama-2-7b-hf", 0.9)
    assert seed.source == "paper:meta-llama/Llama-2-7b-hf@0.9"
    assert seed.point["lr"] == 1e-3 and seed.point["lmda"] == 1e-4  # lmda: the value the cosine ends at
    assert seed.point["lmda_schedule"] == "cosine" and seed.point["penalty"] == "coupled"
    assert set(seed.point) == set(space.dimensions)  # a complete point: every searcher accepts it
    small = paper_seed(space, "smollm2-135m", 0.72)  # by size: OPT-125M, nearest sparsity 0.7
    assert small.source == "paper:facebook/opt-125m@0.7" and small.point["lr"] == 1e-4


@pytest.mark.parametrize("steps", [32, 300])
@pytest.mark.parametrize("median_rms, lr", [(0.19020, 6e-4), (0.0395, 1.2e-4)])  # SmolLM2-135M, Gemma-3-270M
def test_rule_seed_is_exactly_what_elsa_prune_runs(steps, median_rms, lr):
    # The first trial of a default search must be the defaults themselves: mapped through the
    # space (schedule ends, start_fraction) it gives the config `elsa prune` would run, field by
    # field, with the rule's lr scaled to the model's weights.
    from elsa.config import make_config
    from tune.seed import RULE, seed_points

    space = load_space()
    user = {"model": "m", "sparsity": 0.8, "steps": steps}  # what a trial's config is built from (tune/trial.py)
    base = make_config(user).model_dump(mode="json")
    # no lmda searched: no Table 5 point; the allocation is: the rule again from the uniform start
    seed, uniform = seed_points(space, base, "m", 0.8, median_rms)
    assert seed.kind == RULE and seed.notes == () and seed.point["lr"] == lr and seed.point["allocation"] == "owl"
    assert uniform.kind == "rule/allocation:uniform" and uniform.point == {**seed.point, "allocation": "uniform"}
    assert all(space.dimensions[name].contains(value) for name, value in seed.point.items())  # inside every range
    trial = trial_config(user, space.overrides(seed.point, base)).model_dump(mode="json")
    expected = {**base, "lr": lr}
    differ = [k for k, v in expected.items() if trial[k] != (pytest.approx(v) if isinstance(v, float) else v)]
    assert differ == []
    assert trial["penalty"] == "decoupled" and trial["interval"] == (2 if steps <= 100 else 4)

    paper = load_space("paper")
    both = seed_points(paper, base, "m", 0.8, median_rms)  # the paper's space: rule, then Table 5
    assert [s.kind for s in both] == ["rule", "paper"] and both[1].point["penalty"] == "coupled"
    assert both[0].notes == ()  # start_fraction 0.1 keeps the rule's rho start there too
    # a coupled trial gets the coupled rule for what it does not sample, as `elsa prune --penalty coupled`
    coupled = trial_config(user, paper.overrides(both[1].point, base))
    prune = make_config(user, {"penalty": "coupled"})
    assert (coupled.interval, coupled.train_embeddings) == (prune.interval, prune.train_embeddings) == (32, True)


def test_rule_seed_needs_the_weight_scale_for_an_unset_lr():
    from elsa.config import make_config
    from tune.seed import rule_seed

    base = make_config({"model": "m", "sparsity": 0.7, "steps": 32}).model_dump(mode="json")
    assert rule_seed(load_space(), base, None) is None  # lr searched, nothing to scale it by: no rule point
    fixed = parse_space({"rho": {"loguniform": [1e-3, 0.3]}})
    assert rule_seed(fixed, base, None).point == {"rho": 0.05}  # lr not searched: the trial resolves it
    user = rule_seed(load_space(), {**base, "lr": 2e-3}, None)
    assert user.point["lr"] == 2e-3  # a user's own lr is the baseline


def test_choices_the_config_refuses_are_not_searched():
    """The default space searches OWL against uniform; with 2:4 the config refuses OWL, so the
    search runs uniform only (fixed), says why, and keeps every other dimension."""
    from tune.errors import SearchError
    from tune.runner import SearchRequest, _base_config, feasible_space

    def base(sparsity, **config):
        return _base_config(SearchRequest("m", [sparsity], config=config), sparsity)

    said = []
    space = load_space()
    nm = feasible_space(space, base(0.5, pattern="2:4"), said.append)
    assert "allocation" not in nm.dimensions and nm.fixed["allocation"] == "uniform"
    assert set(nm.dimensions) == set(space.dimensions) - {"allocation"} and "allocation=owl" in said[0]
    assert feasible_space(space, base(0.8), said.append) == space and len(said) == 1
    only_owl = parse_space({"allocation": {"choice": ["owl"]}, "lr": {"loguniform": [1e-4, 1e-3]}})
    with pytest.raises(SearchError, match="allocation choices \\['owl'\\] are all refused"):
        feasible_space(only_owl, base(0.5, pattern="2:4"), said.append)


def test_bundled_spaces_by_name_and_an_unknown_one_named():
    assert {"default", "paper"} <= set(__import__("tune.space", fromlist=["x"]).bundled_spaces())
    assert "lmda" not in load_space("default").dimensions and load_space().fixed == {"penalty": "decoupled"}
    with pytest.raises(SpaceError, match="neither a file nor a bundled space.*default, paper"):
        load_space("papers")


def test_trial_rows_mark_each_seed_once_by_kind(tmp_path):
    from types import SimpleNamespace

    from tune.results import trial_rows

    def result(index: int, lr: float, loss: float, step: int = 4):
        path = tmp_path / f"run_trial_{index:05x}_{index:05d}_{index}_lr={lr}"
        metrics = {"trial_id": f"{index:05x}", "step": step, "val_loss_projected": loss}
        return SimpleNamespace(path=path, metrics=metrics, config={"lr": lr}, error=None)

    grid = [result(3, 1e-3, 4.0), result(1, 6e-4, 5.0), result(2, 2e-4, 6.0, step=2), result(4, 6e-4, 4.5)]
    rows = trial_rows(grid, 4, 50.0, {"rule": {"lr": 6e-4}, "paper": {"lr": 2e-4}})
    assert [r.trial_id for r in rows] == ["00001", "00002", "00003", "00004"]  # creation order
    assert [r.seed for r in rows] == ["rule", "paper", "", ""]  # the later repeat of the rule's point is no seed
    assert [r.outcome for r in rows] == ["completed", "stopped_early", "completed", "completed"]


def test_divergence_is_recognised():
    assert diverged({"val_loss_projected": 3.0}, 50.0) is None
    assert diverged({"val_loss_projected": float("nan")}, 50.0) == "nonfinite_loss"
    assert diverged({"val_loss_projected": NONFINITE_LOSS, "nonfinite_loss": 1}, 50.0) == "nonfinite_loss"
    assert diverged({"val_loss_projected": 60.0}, 50.0) == "exploded_loss"


def test_report_callback_forwards_only_evaluations_with_finite_losses():
    from tune.trial import SearchReportCallback

    class Queue(list):
        put = list.append

    callback = object.__new__(SearchReportCallback)  # the real constructor needs a Tune session
    callback._training_actor_item_queue = Queue()
    callback.after_report(None, [{"step": 4, "checkpoint_step": 4}], checkpoint=None)  # no metric: not for Tune
    callback.after_report(None, [{"step": 1, "val_loss_projected": 6.5}], checkpoint=None)
    callback.after_report(None, [{"step": 2, "val_loss_projected": float("nan")}], checkpoint=None)
    sent = callback._training_actor_item_queue
    assert [m["step"] for m in sent] == [1, 2]
    assert sent[1]["val_loss_projected"] == NONFINITE_LOSS and sent[1]["nonfinite_loss"] == 1


def test_nonfinite_error_is_found_inside_a_worker_group_error():
    from ray.train import WorkerGroupError

    from elsa.loop import NonFiniteLossError
    from tune.trial import nonfinite_error

    inner = NonFiniteLossError("training loss is nan at step 2 (lr=1e+30, lambda=0.002): lower --lr")
    assert nonfinite_error(WorkerGroupError("worker 0 failed", {0: inner})).startswith("training loss is nan at step 2")
    assert nonfinite_error(RuntimeError("worker died: OOM")) is None


def test_tune_flags_parse_into_a_request():
    from tune.cli import request_from_args

    args = make_parser().parse_args(
        [
            "tune",
            "--model",
            "m",
            "--sparsity",
            "0.7",
            "0.8",
            "--trials",
            "3",
            "--steps",
            "16",
            "--trial-resources",
            '{"CPU": 1, "trainer": 1}',
            "--search",
            "random",
            "--name",
            "n",
        ]
    )
    request, where = request_from_args(args)
    assert request.sparsities == [0.7, 0.8] and request.trials == 3 and request.config == {"steps": 16}
    assert where.resource_timeout == RESOURCE_TIMEOUT_S
    args = make_parser().parse_args(["tune", "--sparsity", "0.7", "--resource-timeout", "30"])
    assert request_from_args(args)[1].resource_timeout == 30.0
    assert request.trial_resources == {"CPU": 1, "trainer": 1} and request.search == "random" and request.name == "n"
    with pytest.raises(ValueError, match="not JSON"):
        request_from_args(make_parser().parse_args(["tune", "--sparsity", "0.7", "--trial-resources", "{CPU: 1"]))


def test_one_trial_is_its_driver_and_its_workers_and_custom_resources_count():
    """What a search on a joined cluster waits for before its first trial (tune.runner._fit_check)."""
    from tune.runner import SearchRequest, trial_bundles

    request = SearchRequest(
        model="m", sparsities=[0.7], trial_resources={"CPU": 0.5, "trainer": 1}, workers_per_trial=2
    )
    bundles = trial_bundles(request)
    assert bundles == [{"CPU": 0.5, "trainer": 1}, {"CPU": 0.5}, {"CPU": 0.5}]
    assert describe(bundles) == "1 x {CPU: 0.5, trainer: 1} + 2 x {CPU: 0.5}"
    assert bundles_fit(bundles, [{"CPU": 1.5, "trainer": 1.0}])
    assert not bundles_fit(bundles, [{"CPU": 8.0}])  # no node offers the worker type's `trainer`
    assert trial_bundles(SearchRequest(model="m", sparsities=[0.7], trial_resources={}, gpu=True)) == [{"GPU": 1.0}]


def test_searchers_are_built_or_refused_clearly():
    from tune.search import make_scheduler, make_searcher

    assert type(make_searcher("optuna", [{"lr": 1e-4}], 8, 0)).__name__ == "OptunaSearch"
    assert type(make_searcher("random", [{"lr": 1e-4}], 8, 0)).__name__ == "BasicVariantGenerator"
    try:
        import hyperopt  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install hyperopt"):
            make_searcher("hyperopt", [], 8, 0)
    with pytest.raises(ValueError, match="grace-period"):
        make_scheduler("asha", max_t=8, grace_period=9, reduction_factor=2)


@pytest.mark.ray
def test_trial_that_cannot_be_placed_is_refused_before_anything_starts(tmp_path, tiny_model_dir, ray_session):
    from tune.errors import SearchError

    with pytest.raises(SearchError, match="trainer"):
        tiny_search(
            tmp_path,
            tiny_model_dir,
            ["--sparsity", "0.7", "--trials", "2", "--trial-resources", '{"CPU": 1, "trainer": 1}', "--name", "x"],
        )
    assert not (tmp_path / "storage" / "x").exists()  # no state left behind: the name stays free


@pytest.mark.parametrize("timeout", ["0", "nan", "inf"])
def test_unusable_resource_timeout_is_refused_before_ray(tmp_path, tiny_model_dir, timeout):
    from tune.errors import SearchError

    with pytest.raises(SearchError, match=rf"--resource-timeout {timeout}\S* must be a number of seconds > 0"):
        tiny_search(tmp_path, tiny_model_dir, ["--sparsity", "0.7", "--resource-timeout", timeout, "--name", "x"])
    assert not (tmp_path / "storage" / "x").exists()
