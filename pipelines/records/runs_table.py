"""The text of ``elsa compare``: one run a line, and what the runs' numbers depend on.

Why a module of its own: the table decides which columns a reader needs (a search's trials differ
in lr, rho, interval; a method comparison in method and sparsity), apart from reading MLflow
(:mod:`pipelines.records.compare`) and drawing figures.
"""

from __future__ import annotations

import math

MISSING = "-"


def sort_key(row: dict):
    sparsity = row.get("sparsity")
    return (
        str(row.get("model") or ""),
        str(row.get("method") or ""),
        sparsity is None,
        sparsity if sparsity is not None else 0.0,
        str(row.get("penalty") or ""),
        row.get("held_out") is None,  # a search's trials best first, its parent run after them
        row.get("held_out") or 0.0,
        str(row.get("run_id") or ""),
    )


def _metric_order(key: str):
    group = 0 if key.startswith("ppl_") else 2 if key == "zero_shot_avg" else 1
    return (group, key)


def format_value(key: str, value: float | None) -> str:
    if value is None:
        return MISSING
    if not math.isfinite(value):
        return str(value)
    if key.startswith("ppl_"):
        return f"{value:.2f}" if abs(value) < 1e6 else f"{value:.3e}"
    return f"{value:.4f}"


def _setting(value) -> str:
    """A setting as the table shows it: numbers to 3 significant digits."""
    if value in (None, "", "None"):
        return MISSING
    try:
        return f"{float(value):.3g}"
    except ValueError:
        return str(value)


def _varied_settings(rows: list[dict]) -> list[str]:
    """The settings on which the runs differ, in the order they were recorded: a search's trials
    get their lr, rho, interval... columns; runs that agree on a setting do not repeat it."""
    keys = list(dict.fromkeys(k for row in rows for k in row.get("settings", {})))
    return [k for k in keys if len({_setting(row.get("settings", {}).get(k)) for row in rows}) > 1]


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table, one run per line, sorted by model, method, sparsity, held-out loss.

    Columns: the parameters, status, a short run id, the parent run where any run has one (a
    search's trials), the settings the runs differ in, then every metric any run has (perplexities
    first, then accuracies, then the zero-shot average) and the last projected held-out loss (with
    its step where the runs' steps differ); ``-`` where a run lacks a value.
    """
    if not rows:
        return "(no runs)"
    metrics = sorted({k for row in rows for k in row.get("metrics", {})}, key=_metric_order)
    parent = ["parent"] if any(row.get("parent_run_id") for row in rows) else []
    settings = _varied_settings(rows)
    held_out = ["val_loss_projected"] if any(row.get("held_out") is not None for row in rows) else []
    measured = {row.get("held_out_step") for row in rows if row.get("held_out") is not None}
    held_out += ["at_step"] * (len(measured) > 1)  # losses of trials stopped early are from earlier steps
    header = ["model", "method", "sparsity", "pattern", "penalty", "windows", "status", "run", *parent]
    header += [*settings, *metrics, *held_out]
    lines = []
    for row in sorted(rows, key=sort_key):
        sparsity = row.get("sparsity")
        cells = [
            str(row.get("model") or MISSING),
            str(row.get("method") or MISSING),
            MISSING if sparsity is None else f"{sparsity:g}",
            str(row.get("pattern") or MISSING),
            str(row.get("penalty") or MISSING),
            str(row.get("provenance", {}).get("windows.protocol") or MISSING),
            str(row.get("status") or MISSING),
            str(row.get("run_id") or MISSING)[:8],
            *[str(row.get("parent_run_id") or MISSING)[:8] for _ in parent],
            *(_setting(row.get("settings", {}).get(k)) for k in settings),
            *(format_value(k, row.get("metrics", {}).get(k)) for k in metrics),
            *(format_value(k, row.get("held_out")) for k in held_out[:1]),
            *(str(row.get("held_out_step") or MISSING) for _ in held_out[1:]),
        ]
        lines.append(cells)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    numeric = {2, *range(8 + len(parent), len(header))}

    def render(cells: list[str]) -> str:
        return "  ".join(
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule, *(render(line) for line in lines)])


def format_provenance(rows: list[dict]) -> str:
    """What the runs' numbers depend on besides their configs, one ``key: value`` per line.

    Keys on which all runs agree are listed once; keys on which they differ are listed per run
    (short id), so a reader sees at once whether two perplexities are comparable.
    """
    recorded = [row for row in sorted(rows, key=sort_key) if row.get("provenance")]
    if not recorded:
        return "(no run recorded its provenance)"
    keys = sorted({k for row in recorded for k in row["provenance"]})
    same = [k for k in keys if len({row["provenance"].get(k, MISSING) for row in recorded}) == 1]
    lines = [f"same in all {len(recorded)} runs:"] + [f"  {k}: {recorded[0]['provenance'][k]}" for k in same]
    for key in (k for k in keys if k not in same):
        lines.append(f"differs: {key}")
        lines += [f"  {str(row['run_id'])[:8]}: {row['provenance'].get(key, MISSING)}" for row in recorded]
    return "\n".join(lines)
