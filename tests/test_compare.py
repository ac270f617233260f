"""Reading runs back from a real sqlite MLflow store: the table, the figures and the errors."""

from __future__ import annotations

import time
from types import SimpleNamespace

import mlflow
import pytest
from mlflow.entities import Metric, Param

from pipelines.records.compare import (
    collect_runs,
    format_table,
    main,
    plot_metric_vs_step,
    plot_ppl_vs_sparsity,
    ppl_series,
)

PPL = "ppl_wikitext2-bundled"
# (model, method, sparsity, penalty, status, metrics); the paper's OPT-125M numbers, mostly.
RUNS = [
    ("opt-125m", "elsa", 0.5, "coupled", "FINISHED", {PPL: 34.14, "ppl_c4": 31.52}),
    ("opt-125m", "elsa", 0.7, "coupled", "FINISHED", {PPL: 49.57, "ppl_c4": 39.86}),
    ("opt-125m", "elsa", 0.9, "coupled", "FINISHED", {PPL: 95.33}),
    ("opt-125m", "elsa", 0.9, "decoupled", "FINISHED", {PPL: 88.5}),
    ("opt-125m", "wanda", 0.5, "coupled", "FINISHED", {PPL: 38.93}),
    ("opt-125m", "wanda", 0.7, "coupled", "FINISHED", {PPL: 351.8}),
    ("opt-125m", "wanda", 0.7, "coupled", "FINISHED", {PPL: 420.0}),  # a worse repeat
    ("opt-125m", "wanda", 0.9, "coupled", "FAILED", {PPL: 1.0}),  # failed: never plotted
    (
        "smollm2-135m",
        "sparsegpt",
        0.7,
        "coupled",
        "FINISHED",
        {PPL: 239.2, "acc_arc_easy": 0.41, "acc_rte": 0.53, "zero_shot_avg": 0.47},
    ),
]


def _log_runs(client, experiment_id: str) -> dict[int, str]:
    now = int(time.time() * 1000)
    ids = {}
    for index, (model, method, sparsity, penalty, status, metrics) in enumerate(RUNS):
        run = client.create_run(experiment_id, run_name=f"run{index}")
        run_id = run.info.run_id
        params = {
            "model": model,
            "method": method,
            "sparsity": sparsity,
            "pattern": "unstructured",
            "penalty": penalty,
            "lr": 1e-4,
        }
        logged = [Metric(key, value, now, 100) for key, value in metrics.items()]
        logged.append(Metric("train_loss", 3.0, now, 100))  # not a compared metric
        if method == "elsa":  # convergence histories, decaying geometrically
            for step in range(0, 100, 10):
                logged.append(Metric("primal_residual", 0.5 * 0.7 ** (step / 10), now, step))
                logged.append(Metric("val_loss_projected", 6.0 - step / 50, now, step))
        params = [Param(key, str(value)) for key, value in params.items()]
        client.log_batch(run_id, metrics=logged, params=params)
        client.set_terminated(run_id, status=status)
        ids[index] = run_id
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store holding RUNS in experiment ``paper`` (and an empty one); read-only after.

    Built once per module: creating a sqlite store runs MLflow's schema migrations (seconds).
    """
    tmp_path = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the default name, see the cwd test
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("paper", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_experiment("empty", artifact_location=(tmp_path / "artifacts2").as_uri())
    ids = _log_runs(client, experiment_id)
    return uri, ids


def _assert_png(path, min_bytes: int = 8000) -> None:
    """A real PNG with something drawn on it: not a blank canvas."""
    import matplotlib.image

    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > min_bytes
    pixels = matplotlib.image.imread(path)[..., :3]
    ink = (pixels < 0.9).any(axis=-1).mean()
    assert ink > 0.02, f"{path} is almost blank ({ink:.3%} of pixels drawn)"


def test_collect_runs_reads_params_and_metrics(store):
    uri, ids = store
    rows = {row["run_id"]: row for row in collect_runs("paper", uri)}
    assert set(rows) == set(ids.values())
    for index, (model, method, sparsity, penalty, status, metrics) in enumerate(RUNS):
        row = rows[ids[index]]
        assert (row["model"], row["method"], row["penalty"]) == (model, method, penalty)
        assert row["sparsity"] == pytest.approx(sparsity)
        assert row["pattern"] == "unstructured"
        assert row["status"] == status
        assert row["metrics"] == pytest.approx(metrics)  # train_loss and step metrics left out
    assert collect_runs("empty", uri) == []


def test_table_holds_values_sorted_by_model_method_sparsity(store):
    uri, ids = store
    rows = collect_runs("paper", uri)
    table = format_table(rows)
    lines = table.splitlines()
    header, body = lines[0], lines[2:]
    assert len(body) == len(RUNS)
    params = ["model", "method", "sparsity", "pattern", "penalty", "windows", "status", "run"]
    assert header.split()[:8] == params
    # perplexities first, then accuracies, then the average
    # then the last projected held-out loss; no setting column: every run has the same lr
    assert header.split()[8:] == ["ppl_c4", PPL, "acc_arc_easy", "acc_rte", "zero_shot_avg", "val_loss_projected"]
    for index, run_id in ids.items():
        (line,) = [line for line in body if run_id[:8] in line]
        assert f"{RUNS[index][4]}" in line
        assert f"{RUNS[index][5][PPL]:.2f}" in line
    order = [(line.split()[0], line.split()[1], float(line.split()[2])) for line in body]
    assert order == sorted(order)
    sparsegpt = next(line for line in body if "sparsegpt" in line)
    assert "0.4100" in sparsegpt and "0.4700" in sparsegpt
    wanda = next(line for line in body if "wanda" in line)
    assert " - " in wanda  # no accuracies for this run
    # fixed width: every metric column ends at the same offset as its header
    end = header.index("val_loss_projected") + len("val_loss_projected")
    assert all(len(line) == end for line in [header] + [b for b in body if "sparsegpt" in b])
    assert format_table([]) == "(no runs)"


def test_a_searchs_trials_show_their_settings_best_first_under_their_parent(store):
    """A search's parent run and trials: the settings they differ in get columns, the trials are
    ranked by held-out loss, and the parent run's short id stands beside each trial."""
    uri, _ = store
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("search")
    base = {"model": "m", "method": "elsa", "sparsity": "0.8", "penalty": "decoupled", "steps": "64"}
    parent = client.create_run(experiment_id, run_name="search@0.8").info.run_id
    client.log_batch(parent, params=[Param(k, v) for k, v in base.items()])
    trials = {"rule": ("0.0006", "2", "owl", "ntp", 4.9995, 64), "wide": ("0.0021", "2", "owl", "ntp", 6.49, 16)}
    trials["close"] = ("0.00042", "1", "uniform", "ntp+kd", 5.037, 64)
    for name, (lr, interval, allocation, objective, loss, step) in trials.items():
        run = client.create_run(experiment_id, run_name=name, tags={"mlflow.parentRunId": parent}).info.run_id
        settings = {"lr": lr, "interval": interval, "allocation": allocation, "loss": objective}
        params = [Param(k, v) for k, v in {**base, **settings}.items()]
        history = [Metric("val_loss_projected", loss + 1.0, 0, 8), Metric("val_loss_projected", loss, 0, step)]
        client.log_batch(run, metrics=history, params=params)
    lines = format_table(collect_runs("search", uri)).splitlines()
    header, body = lines[0].split(), lines[2:]
    # steps: the same in all, no column; the wide trial was stopped at step 16, so the step shows
    assert header[8:] == ["parent", "lr", "interval", "allocation", "loss", "val_loss_projected", "at_step"]
    assert [line.split()[9:] for line in body] == [
        ["0.0006", "2", "owl", "ntp", "4.9995", "64"],
        ["0.00042", "1", "uniform", "ntp+kd", "5.0370", "64"],
        ["0.0021", "2", "owl", "ntp", "6.4900", "16"],
        ["-", "-", "-", "-", "-", "-"],  # the parent run: no trial settings of its own, listed last
    ]
    assert all(line.split()[8] == parent[:8] for line in body[:3])


def _flat(pairs):
    """[(x, y), ...] -> [x, y, ...]: pytest.approx compares flat sequences only."""
    return [value for pair in pairs for value in pair]


def test_ppl_series_best_run_per_point_and_penalty_split(store):
    uri, _ = store
    series = ppl_series(collect_runs("paper", uri), PPL)
    assert set(series) == {"opt-125m", "smollm2-135m"}
    opt = series["opt-125m"]
    assert set(opt) == {"elsa (coupled)", "elsa (decoupled)", "wanda"}
    assert _flat(opt["elsa (coupled)"]) == pytest.approx(_flat([(0.5, 34.14), (0.7, 49.57), (0.9, 95.33)]))
    assert _flat(opt["wanda"]) == pytest.approx(_flat([(0.5, 38.93), (0.7, 351.8)]))  # min of repeats, no FAILED
    assert series["smollm2-135m"] == {"sparsegpt": [(0.7, pytest.approx(239.2))]}


def test_plots_are_written(store, tmp_path):
    uri, ids = store
    rows = collect_runs("paper", uri)
    png = plot_ppl_vs_sparsity(rows, tmp_path / "fig" / "ppl.png")
    _assert_png(png)
    elsa_runs = [ids[i] for i, run in enumerate(RUNS) if run[1] == "elsa"]
    residual = plot_metric_vs_step(elsa_runs + [ids[4]], "primal_residual", tmp_path / "r.png", uri)
    _assert_png(residual)
    with pytest.raises(ValueError, match="ppl_c4"):
        plot_ppl_vs_sparsity(rows, tmp_path / "none.png", metric="ppl_ptb")
    with pytest.raises(ValueError, match="'primal_residual'"):
        plot_metric_vs_step([ids[4]], "primal_residual", tmp_path / "none.png", uri)
    assert not (tmp_path / "none.png").exists()


def test_a_one_point_history_is_drawn_as_a_marker(monkeypatch, tmp_path):
    """A 32-step run validates once: its val_loss_projected is a single point, which a plain line
    does not draw. The figure's artists are checked, not only that a file was written."""
    import pipelines.records.compare as compare

    histories = {"short": [(32, 5.2)], "long": [(step, 6.0 - step / 100) for step in (32, 64, 96)]}

    class Client:  # the two calls plot_metric_vs_step makes of an MlflowClient
        def get_metric_history(self, run_id, metric):
            return [SimpleNamespace(step=s, value=v, timestamp=0) for s, v in histories[run_id]]

        def get_run(self, run_id):
            return SimpleNamespace(
                data=SimpleNamespace(params={}), info=SimpleNamespace(run_name=run_id, run_id=run_id)
            )

    drawn = []
    monkeypatch.setattr(compare, "_client", lambda uri: Client())
    monkeypatch.setattr(compare, "_save", lambda figure, out: drawn.append(figure) or out)
    plot_metric_vs_step(["short", "long"], "val_loss_projected", tmp_path / "v.png")
    lines = {line.get_label().split()[0]: line for line in drawn[0].axes[0].get_lines()}
    assert list(lines["short"].get_xdata()) == [32] and lines["short"].get_marker() == "o"
    assert lines["long"].get_marker() in (None, "None", "") and lines["long"].get_linestyle() == "-"


def test_main_prints_table_and_writes_everything(store, tmp_path, capsys):
    uri, ids = store
    written = main("paper", uri, tmp_path / "out")
    printed = capsys.readouterr().out
    assert ids[0][:8] in printed and "49.57" in printed
    assert set(written) == {
        "table",
        "rows",
        "provenance",
        f"{PPL}_vs_sparsity",
        "ppl_c4_vs_sparsity",
        "primal_residual_vs_step",
        "val_loss_projected_vs_step",
    }
    assert written["table"].read_text().strip() == format_table(collect_runs("paper", uri))
    for name, path in written.items():
        if path.suffix == ".png":
            _assert_png(path)


def test_default_store_is_sqlite_in_cwd(store, tmp_path, monkeypatch):
    uri, ids = store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="mlflow.db"):
        collect_runs("paper", None)
    assert not (tmp_path / "mlflow.db").exists()  # reading must not create an empty store
    monkeypatch.chdir(uri.removeprefix("sqlite:///").removesuffix("mlflow.db"))
    rows = collect_runs("paper", None)
    assert sorted(row["run_id"] for row in rows) == sorted(ids.values())


def test_unknown_experiment_lists_existing(store):
    uri, _ = store
    with pytest.raises(ValueError, match="'nope'.*empty, paper"):
        collect_runs("nope", uri)
