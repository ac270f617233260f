"""What a bench folder holds and shows: results.json, results.md and the perplexity plot.

Apart from bench/run_bench.py, which runs the cells, so that other scripts (bench/headline.py)
read results without the runner, and the runner stays one screen of cell logic.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path


def read_results(out_dir: Path) -> list[dict]:
    """The cells recorded so far in ``out_dir/results.json`` (none if it does not exist)."""
    path = out_dir / "results.json"
    return json.loads(path.read_text())["results"] if path.is_file() else []


def record_steps(record: dict) -> int | None:
    """A cell's ELSA step budget: the record's own field, else its config's (older records)."""
    return record.get("steps", record.get("config", {}).get("steps"))


def residual_curve_text(curve: list | None, points: int = 8) -> str:
    """``0.43 > 0.21 > 0.09`` from ``[[step, residual], ...]`` (z/u-updates), or ``-``.

    At most ``points`` values, evenly spaced and always the first and last, so that a long run's
    225 updates do not fill a table cell; results.json keeps every one."""
    if not curve:
        return "-"
    count = min(points, len(curve))
    picked = [round(i * (len(curve) - 1) / max(count - 1, 1)) for i in range(count)]  # spacing >= 1: distinct
    return " > ".join(f"{curve[i][1]:.2f}" for i in picked)


def _dense_by_protocol(ok: list[dict]) -> dict[str, dict]:
    """The dense cell of each window protocol: ratios compare cells measured the same way."""
    return {r.get("windows", "bos"): r for r in ok if r["method"] == "dense"}


def _plot_rows(ok: list[dict], model: str, metric: str) -> list[dict]:
    rows = []
    for r in ok:
        if r["method"] == "dense" or metric not in r:
            continue
        label, penalty = (
            (f"{'elsa defaults' if r['method'] == 'elsa' else 'elsa preset'}, {r.get('steps')} steps", None)
            if r["method"] in ("elsa", "elsa-preset")
            else (r["method"].split("-")[0], r.get("penalty"))
        )
        rows.append(
            {
                "model": model,
                "method": label,
                "penalty": penalty,
                "sparsity": r["sparsity"],
                "status": None,
                "metrics": {metric: r[metric]},
            }
        )
    return rows


def _ppl_cells(r: dict, dense: dict | None, metrics: list[str]) -> str:
    """``ppl | ppl / dense`` for each text, ``-`` where a cell lacks it (cells from before it was measured)."""
    cells = []
    for metric in metrics:
        value, base = r.get(metric), (dense or {}).get(metric)
        cells += [f"{value:.2f}" if value is not None else "-", f"{value / base:.2f}" if value and base else "-"]
    return " | ".join(cells)


def _table_line(r: dict, dense: dict | None, metrics: list[str]) -> str:
    steps = r.get("config", {}).get("steps", "-") if r["method"].startswith("elsa") else "-"
    details = ", embeddings frozen" if r.get("train_embeddings") is False else ""
    details += f", warm-up {r['warmup_steps']}" if r.get("warmup_steps") else ""
    steps = f"{steps} ({r['init']}, {r['loss']}{details}, kept {r['kept']})" if r.get("kept") else steps
    return (
        f"| {r['method']} | {r.get('window_protocol', r.get('windows', 'bos'))} | {r['sparsity']:.1f} | "
        f"{_ppl_cells(r, dense, metrics)} | {r['prune_s']:.0f} | {r['peak_rss_mb']:.0f} "
        f"| {steps} | {residual_curve_text(r.get('residual_curve'))} |"
    )


def write_reports(results: list[dict], out_dir: Path, metric: str, args, methods: tuple[str, ...]) -> None:
    """results.json, results.md (table with ratios to dense, per text) and ppl_vs_sparsity.png;
    rows by sparsity, then in the order of ``methods``."""
    from pipelines.records.compare import plot_ppl_vs_sparsity

    out_dir.mkdir(parents=True, exist_ok=True)
    staged = out_dir / "results.json.tmp"  # then renamed: a concurrent runner never reads half a file
    staged.write_text(json.dumps({"command": " ".join(sys.argv), "settings": vars(args), "results": results}, indent=1))
    staged.replace(out_dir / "results.json")
    ok = [r for r in results if "error" not in r]
    dense = _dense_by_protocol(ok)
    rows = _plot_rows(ok, args.model, metric)
    if rows:
        plot_ppl_vs_sparsity(rows, out_dir / "ppl_vs_sparsity.png", metric=metric)
    metrics = [metric, *sorted({k for r in ok for k in r if k.startswith("ppl_") and k != metric})]
    commands = list(dict.fromkeys(r.get("command", "(not recorded)") for r in ok))
    lines = [
        f"# Benchmark: {args.model}",
        "",
        "Commands (in the order their cells first ran; a rerun skips finished cells):",
        "",
        *[f"- `{command}`" for command in commands],
        "",
        f"Perplexity on {', '.join(m.removeprefix('ppl_') for m in metrics)}: {args.eval_windows} windows of "
        f"{args.eval_seqlen} tokens; windows: the protocol (elsa/text/data.py); ratios to the dense cell of the same "
        "protocol",
        "",
        machines_line(ok),
        "",
        "| method | windows | sparsity | "
        + " | ".join(f"ppl {m.removeprefix('ppl_')} | / dense" for m in metrics)
        + " | prune time (s) | peak RSS (MB) | ELSA steps | primal residual |",
        "|---|---|---|" + "---|---|" * len(metrics) + "---|---|---|---|",
    ]
    order = sorted(ok, key=lambda r: (r["sparsity"], methods.index(r["method"]), r.get("steps") or 0))
    lines += [_table_line(r, dense.get(r.get("windows", "bos")), metrics) for r in order]
    lines += [f"| {r['method']} | | {r['sparsity']:.1f} | FAILED: {r['error'][:80]} |" for r in results if "error" in r]
    lines += _zero_shot_lines(order)
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")


def machines_line(cells: list[dict]) -> str:
    """Which machines the table's cells ran on: a pair is compared within one machine only."""
    counts = Counter(
        f"{r['cpu']}, {r.get('torch_threads', '?')} threads" if "cpu" in r else "not recorded" for r in cells
    )
    return "Machines (cells): " + "; ".join(f"{name} ({n})" for name, n in counts.items())


def _examples(scored: list[dict], tasks: list[str]) -> str:
    """Examples scored per task, from the cells' own counts: a limit above a task's size scores all
    of it (ARC-easy's validation split has 570), so the limit alone would overstate the sample."""
    counts = {t: sorted({r["zero_shot_n"][t] for r in scored if t in r.get("zero_shot_n", {})}) for t in tasks}
    if not all(counts.values()):  # cells from before zero_shot_n: their limit is all they recorded
        return "/".join(sorted({str(r.get("zero_shot_limit") or "all") for r in scored})) + " a task"
    return ", ".join(f"{t} {'/'.join(map(str, n))}" for t, n in counts.items())


def _zero_shot_lines(cells: list[dict]) -> list[str]:
    """A second table: accuracy per zero-shot task with its standard error, and the unweighted mean."""
    scored = [r for r in cells if "zero_shot_avg" in r]
    if not scored:
        return []
    tasks = sorted({k.removeprefix("acc_") for r in scored for k in r if k.startswith("acc_")})
    lines = [
        "",
        f"Zero-shot accuracy (lm-eval, validation splits; examples scored: {_examples(scored, tasks)}; "
        "± standard error)",
        "",
        "| method | sparsity | ELSA steps | " + " | ".join(tasks) + " | mean |",
        "|---|---|---|" + "---|" * (len(tasks) + 1),
    ]
    for r in scored:
        accs = [
            f"{r[f'acc_{t}']:.3f} ± {r.get(f'stderr_acc_{t}', float('nan')):.3f}" if f"acc_{t}" in r else "-"
            for t in tasks
        ]
        steps = r.get("steps", "-") if r["method"].startswith("elsa") else "-"
        lines.append(
            f"| {r['method']} | {r['sparsity']:.1f} | {steps} | " + " | ".join(accs) + f" | {r['zero_shot_avg']:.3f} |"
        )
    return lines
