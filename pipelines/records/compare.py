"""Compare the runs of an MLflow experiment: a table and the paper's kind of figures.

Why: every ``elsa prune``/``elsa tune`` run logs its configuration and results to MLflow, but
the question one asks afterwards is a comparison across runs: how does perplexity grow with
sparsity for each method (the paper's Figure 1), which run converged (primal residual, projected
validation loss against step)? This module reads the runs back with ``mlflow.MlflowClient`` and
draws those figures with matplotlib's Agg canvas (no display, no pyplot global state, so it is
safe inside Ray workers and tests). ``elsa compare`` calls :func:`main`.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from pipelines.records.plots import series_style
from pipelines.records.runs_table import MISSING
from pipelines.records.runs_table import format_provenance, format_table, format_value

PARAMS = ("model", "method", "sparsity", "pattern", "penalty")
METRIC_PREFIXES = ("ppl_", "acc_")
METRIC_NAMES = ("zero_shot_avg",)
DEFAULT_PPL_METRIC = "ppl_wikitext2-bundled"
HELD_OUT = "val_loss_projected"  # its latest value: the run's own measure, what a search ranks by
STEP_METRICS = ("primal_residual", HELD_OUT)
# what searches vary (tune/spaces): a column in the table wherever the runs differ in it
SETTINGS = ("lr", "lmda", "lmda_final", "lmda_schedule", "rho", "rho_final", "rho_schedule", "interval")
SETTINGS += ("allocation", "owl_lambda", "steps")  # start settings a search may vary too (tune/starts.py)
SETTINGS += ("loss", "kd_weight", "warmup_steps")  # the training loss and lr warm-up (bench/spaces/loss.yaml)
# tags of a run's record (elsa/provenance.py): versions, machine, text hashes, window protocol
PROVENANCE_PREFIXES = ("version.", "machine.", "data_sha256.", "eval_sha256.", "windows.")
PENALISED = ("elsa",)  # methods whose runs differ by ADMM penalty mode (coupled / decoupled)


def default_tracking_uri(tracking_uri: str | None = None) -> str:
    """The store ``elsa prune`` writes to by default: ``sqlite:///<cwd>/mlflow.db``.

    MLflow 3's file store refuses writes, so the embedded default is a sqlite database; an
    explicit URI or ``MLFLOW_TRACKING_URI`` wins, as in :mod:`pipelines.records.tracking`.
    """
    from pipelines.records.tracking import resolve_tracking_uri

    return resolve_tracking_uri(tracking_uri)


def _client(tracking_uri: str | None):
    import mlflow

    uri = default_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            # MlflowClient would silently create an empty database here.
            raise FileNotFoundError(
                f"no MLflow store at {path} (tracking URI {uri}); run `elsa prune` in this "
                "directory first, or pass --tracking-uri pointing at the store that holds the runs"
            )
    return mlflow.MlflowClient(tracking_uri=uri)


def _wanted_metric(key: str) -> bool:
    return key.startswith(METRIC_PREFIXES) or key in METRIC_NAMES


def _float_or_none(text: str | None) -> float | None:
    if text in (None, "", "None", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _latest_step(run, key: str) -> int | None:
    """The step of ``key``'s latest value: a trial stopped early was measured at an earlier step.
    MLflow's search results carry it only in a private list; None where a version lacks it."""
    steps = [m.step for m in getattr(run.data, "_metric_objs", None) or [] if m.key == key]
    return max(steps) if steps else None


def _row(run) -> dict:
    params, tags = run.data.params, run.data.tags
    # Parameters are the full config; tags repeat the key ones (kept for runs logged by hand).
    values = {key: params.get(key, tags.get(key)) for key in PARAMS}
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "parent_run_id": tags.get("mlflow.parentRunId"),
        **{key: values[key] for key in PARAMS if key != "sparsity"},
        "sparsity": _float_or_none(values["sparsity"]),
        "metrics": {k: float(v) for k, v in run.data.metrics.items() if _wanted_metric(k)},
        "settings": {key: params[key] for key in SETTINGS if key in params},
        "held_out": run.data.metrics.get(HELD_OUT),
        "held_out_step": _latest_step(run, HELD_OUT),
        "provenance": {k: v for k, v in tags.items() if k.startswith(PROVENANCE_PREFIXES)},
    }


def collect_runs(experiment: str, tracking_uri: str | None = None) -> list[dict]:
    """Every run of ``experiment`` as a flat dict (all pages, deleted runs left out).

    Each row: ``run_id``, ``run_name``, ``status``, ``parent_run_id``, the parameters ``model``,
    ``method``, ``sparsity`` (a float, None when a sparsity map was used), ``pattern``,
    ``penalty``, and ``metrics``: the latest value of every ``ppl_*``, ``acc_*`` and
    ``zero_shot_avg`` metric.
    """
    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(
            f"MLflow experiment {experiment!r} does not exist in this store; existing "
            f"experiments: {', '.join(names) or 'none'} (choose one with --experiment)"
        )
    rows, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], max_results=1000, page_token=token)
        rows.extend(_row(run) for run in page)
        token = page.token
        if not token:
            return rows


def series_label(row: dict) -> str:
    """One line per method, split by penalty mode for the ADMM methods (coupled/decoupled)."""
    method = str(row.get("method") or "?")
    penalty = row.get("penalty")
    if method in PENALISED and penalty not in (None, "", "None"):
        return f"{method} ({penalty})"
    return method


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(out)
    return out


def ppl_series(rows: list[dict], metric: str = DEFAULT_PPL_METRIC) -> dict[str, dict[str, list]]:
    """``{model: {series label: [(sparsity, perplexity), ...]}}``, sorted by sparsity.

    Only finished runs (or rows without a status) with a sparsity and a positive finite value
    count. Where several share model, series and sparsity (e.g. Tune trials), the point is the
    lowest perplexity among them: each method is compared at its best hyperparameters, as in
    the paper's Figure 1.
    """
    best: dict[str, dict[str, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        value, sparsity = row.get("metrics", {}).get(metric), row.get("sparsity")
        if value is None or sparsity is None or not math.isfinite(value) or value <= 0:
            continue
        if row.get("status") not in (None, "FINISHED"):
            continue
        series = best[str(row.get("model") or "?")][series_label(row)]
        series[sparsity] = min(value, series.get(sparsity, math.inf))
    return {
        model: {label: sorted(points.items()) for label, points in by_label.items()} for model, by_label in best.items()
    }


def plot_ppl_vs_sparsity(rows: list[dict], out_png: str | Path, metric: str = DEFAULT_PPL_METRIC) -> Path:
    """Perplexity (log scale) against sparsity: one line per method(+penalty), a panel per model.

    The points are those of :func:`ppl_series` (the best run per sparsity).
    """
    points = ppl_series(rows, metric)
    if not points:
        available = sorted({k for row in rows for k in row.get("metrics", {}) if k.startswith("ppl_")})
        raise ValueError(
            f"no finished run has both a sparsity and metric {metric!r}; perplexity metrics "
            f"present: {', '.join(available) or 'none'} (pass one of them as metric)"
        )
    models = sorted(points)
    figure = _new_figure(5.0 * len(models), 4.0)
    for index, model in enumerate(models, start=1):
        axes = figure.add_subplot(1, len(models), index)
        for label, pairs in sorted(points[model].items()):
            axes.plot([100 * x for x, _ in pairs], [y for _, y in pairs], "o-", label=label)
        axes.set_yscale("log")
        axes.set_xlabel("sparsity (%)")
        axes.set_ylabel(f"perplexity ({metric.removeprefix('ppl_')})")
        axes.set_title(model if len(model) <= 40 else "..." + model[-37:])
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    return _save(figure, out_png)


def _run_label(run) -> str:
    """``method sparsity penalty (run id)``, e.g. ``elsa 0.7 decoupled (1a2b3c4d)``."""
    params = run.data.params
    parts = [params.get(key) for key in ("method", "sparsity", "penalty")]
    described = " ".join(str(p) for p in parts if p not in (None, "", "None"))
    return f"{described or run.info.run_name or 'run'} ({run.info.run_id[:8]})"


def plot_metric_vs_step(run_ids: list[str], metric: str, out_png: str | Path, tracking_uri: str | None = None) -> Path:
    """The history of ``metric`` (e.g. ``primal_residual``) against step, one line per run.

    The y axis turns logarithmic when every value is positive and they span more than 50x, as
    residuals usually do. A run with one point (a 32-step run's validation loss) is drawn as a
    marker. Runs without that metric are left out; none having it is an error.
    """
    if isinstance(run_ids, str) or not run_ids:
        raise ValueError(f"run_ids must be a non-empty list of MLflow run ids, got {run_ids!r}")
    client = _client(tracking_uri)
    figure = _new_figure(6.5, 4.0)
    axes = figure.add_subplot(1, 1, 1)
    values: list[float] = []
    for run_id in run_ids:
        history = sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))
        if not history:
            continue
        label = _run_label(client.get_run(run_id))
        axes.plot([m.step for m in history], [m.value for m in history], label=label, **series_style(len(history)))
        values.extend(m.value for m in history)
    if not values:
        raise ValueError(
            f"none of the runs {', '.join(r[:8] for r in run_ids)} logged metric {metric!r}; "
            f"step metrics logged by ELSA runs include {', '.join(STEP_METRICS)}"
        )
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 50:
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel(metric)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, out_png)


def registered_versions(tracking_uri: str | None, run_ids: set[str] | None = None) -> list[dict]:
    """Model-registry versions (``elsa prune --register``), of ``run_ids`` only when given.

    Each: ``name``, ``version``, ``run_id``, ``stage`` (aliases, comma-joined), ``sparsity``,
    ``ppl``, ``export_format`` (from the version's tags), ``source``.
    """
    client = _client(tracking_uri)
    found, token = [], None
    while True:
        page = client.search_model_versions(max_results=1000, page_token=token)
        for version in page:
            if run_ids is not None and version.run_id not in run_ids:
                continue
            tags = version.tags or {}
            found.append(
                {
                    "name": version.name,
                    "version": int(version.version),
                    "run_id": version.run_id,
                    "stage": ",".join(getattr(version, "aliases", []) or []),
                    "sparsity": tags.get("sparsity"),
                    "ppl": tags.get("ppl"),
                    "export_format": tags.get("export_format"),
                    "source": version.source,
                }
            )
        token = page.token
        if not token:
            return sorted(found, key=lambda v: (v["name"], v["version"]))


def format_versions(versions: list[dict]) -> str:
    """A plain-text table of :func:`registered_versions`."""
    header = ["registered model", "version", "sparsity", "ppl", "format", "aliases", "run_id"]
    cells = [
        [
            v["name"],
            str(v["version"]),
            v["sparsity"] or MISSING,
            format_value("ppl_", _float_or_none(v["ppl"])),
            v["export_format"] or MISSING,
            v["stage"] or MISSING,
            v["run_id"] or MISSING,
        ]
        for v in versions
    ]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *cells])


def main(experiment: str, tracking_uri: str | None, out_dir: str | Path) -> dict[str, Path]:
    """Print the table of ``experiment``'s runs; write it, the rows and every figure to ``out_dir``.

    Figures: perplexity against sparsity for each ``ppl_*`` metric present, and the history of
    each of :data:`STEP_METRICS` over the runs that logged it. Returns ``{name: path}``.
    """
    rows = collect_runs(experiment, tracking_uri)
    table = format_table(rows)
    print(table)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"table": out / "runs.txt", "rows": out / "runs.json"}
    written["table"].write_text(table + "\n", encoding="utf-8")
    written["rows"].write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    for metric in sorted({k for row in rows for k in row["metrics"] if k.startswith("ppl_")}):
        try:
            written[f"{metric}_vs_sparsity"] = plot_ppl_vs_sparsity(rows, out / f"{metric}_vs_sparsity.png", metric)
        except ValueError as err:  # e.g. only sparsity-map runs: nothing to draw, say why
            print(f"skipped {metric} against sparsity: {err}")
    provenance = format_provenance(rows)
    print("\n" + provenance)
    written["provenance"] = out / "provenance.txt"
    written["provenance"].write_text(provenance + "\n", encoding="utf-8")
    versions = registered_versions(tracking_uri, {row["run_id"] for row in rows})
    if versions:
        print("\n" + format_versions(versions))
        written["registered"] = out / "registered.txt"
        written["registered"].write_text(format_versions(versions) + "\n", encoding="utf-8")
    run_ids = [row["run_id"] for row in rows]
    for metric in STEP_METRICS:
        try:
            written[f"{metric}_vs_step"] = plot_metric_vs_step(
                run_ids, metric, out / f"{metric}_vs_step.png", tracking_uri
            )
        except ValueError:
            continue  # no run logged it (e.g. only one-shot baselines)
    for name, path in written.items():
        print(f"{name}: {path}")
    return written
