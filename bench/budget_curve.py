"""The budget curve: perplexity against wall seconds for ELSA's defaults and the one-shot methods.

Reads results directories written by ``bench/run_bench.py`` (ELSA cells of the ``elsa`` method,
one per ``--steps``, ``elsa-preset`` cells on their own line, and the one-shot cells; a cell
already read from an earlier directory is not taken again from a later one) and writes into the
first, for one sparsity S%, ``budget_curve-S.md`` (a table) and ``budget_curve-S.png`` (log-log:
wall seconds of the whole prune, warm start included, against WikiText-2 perplexity); cells from
before the ``allocation`` field ran uniform. The 0-step point is the warm start alone (its one-shot
cell). Wall times are only comparable when every cell ran alone on the machine:
``torch_threads`` of each cell is in the table.

    python bench/budget_curve.py --results bench/results bench/results-zeroshot --sparsity 0.8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRIC = "ppl_wikitext2-bundled"
# ELSA's cells on the curve: the rule's, and preset cells (their own line: a preset file may hold
# the rule plus one change, as bench/results-hour/smollm2-135m-intel-kd/presets-kd.yaml does)
ELSA_METHODS = ("elsa", "elsa-preset")


def _one_shot(row: dict) -> bool:
    return not row["method"].startswith("elsa")


def curve_rows(results: list[dict], sparsity: float) -> list[dict]:
    """The cells at ``sparsity``: one-shot methods first, then ELSA by steps."""
    cells = [r for r in results if "error" not in r and r["sparsity"] == sparsity]
    oneshot = sorted(filter(_one_shot, cells), key=lambda r: r["prune_s"])
    elsa = sorted((r for r in cells if r["method"] in ELSA_METHODS), key=lambda r: r["steps"])
    return oneshot + elsa


def _embeddings(row: dict) -> str:
    """ELSA cells from before the ``train_embeddings`` field (0a17552, 2026-12-03) trained them; a
    one-shot method trains nothing."""
    if _one_shot(row):
        return "-"
    return "frozen" if row.get("train_embeddings") is False else "trained"


def _lr(row: dict) -> str:
    """The learning rate an ELSA cell ran with (the rule's changed in 9950fcd, 2026-12-03, for N > 100)."""
    lr = row.get("lr", (row.get("config") or {}).get("lr"))
    return "-" if _one_shot(row) or lr is None else f"{lr:g}"


def _warmup(row: dict) -> str:
    """The lr warm-up of an ELSA cell as a share of its steps: the rule has one since c9ad3c9
    (2026-12-06) above 100 steps; cells without the field ran without one."""
    steps, warmup = row.get("steps"), row.get("warmup_steps") or 0
    return "-" if _one_shot(row) else f"{warmup / steps:.0%}" if steps else "0%"


def _loss(row: dict) -> str:
    """An ELSA cell's training loss: the rule distils from 1,000 steps on since db72ad0 (2026-12-07);
    earlier cells trained on next-token."""
    return "-" if _one_shot(row) else row.get("loss") or "ntp"


def _machine(row: dict) -> str:
    """The CPU a cell ran on: wall times of different machines do not share a line. The ``cpu``
    field dates from ff408e2 (2026-12-06); the machine was an AMD EPYC until 2026-12-05, 21:47."""
    return row.get("cpu") or "CPU not recorded"


def _curve(row: dict) -> str:
    preset = "preset, " if row["method"] == "elsa-preset" else ""
    return (
        f"{preset}{row.get('allocation', 'uniform')} allocation, embeddings {_embeddings(row)}, lr {_lr(row)}, "
        f"warm-up {_warmup(row)}, loss {_loss(row)}, {_machine(row)}"
    )


def merged_results(folders: list[Path]) -> list[dict]:
    """The cells of every folder, each (method, steps, sparsity, warm-up, loss) once: the first
    folder's wins, and each row says where it came from (``folder``)."""
    seen, rows = set(), []
    for folder in folders:
        for row in json.loads((folder / "results.json").read_text())["results"]:
            key = (row["method"], row.get("steps"), row.get("sparsity"), row.get("warmup_steps") or 0, _loss(row))
            if key not in seen:
                seen.add(key)
                rows.append({**row, "folder": folder.name})
    return rows


def table(rows: list[dict], dense: float | None) -> str:
    lines = [
        "| method | steps | allocation | embeddings | lr | warm-up | loss | wall s (prune, warm start included) "
        "| ppl | ppl / dense | kept | threads | machine | folder |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r[METRIC] / dense:.2f}" if dense else "-"
        steps = r.get("steps", "-")
        lines.append(
            f"| {r['method']} | {steps} | {r.get('allocation', 'uniform')} | {_embeddings(r)} | {_lr(r)} "
            f"| {_warmup(r)} | {_loss(r)} | {r['prune_s']:.0f} "
            f"| {r[METRIC]:.1f} "
            f"| {ratio} | {r.get('kept', '-')} "
            f"| {r.get('torch_threads', '-')} | {_machine(r)} | {r.get('folder', '-')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], out_png: Path, sparsity: float) -> Path:
    from pipelines.records.compare import _new_figure, _save

    figure = _new_figure(6.0, 4.2)
    axes = figure.add_subplot(1, 1, 1)
    elsa_rows = [r for r in rows if r["method"] in ELSA_METHODS]
    for curve in dict.fromkeys(map(_curve, elsa_rows)):  # one line per default: changed in eb48eaa, 0a17552, 9950fcd
        elsa = [r for r in elsa_rows if _curve(r) == curve]
        label = f"ELSA, {curve}"
        axes.plot([r["prune_s"] for r in elsa], [r[METRIC] for r in elsa], "o-", label=label)
        for r in elsa:
            axes.annotate(
                str(r["steps"]), (r["prune_s"], r[METRIC]), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
    for r in rows:
        if r["method"] not in ELSA_METHODS:
            axes.plot([r["prune_s"]], [r[METRIC]], "s", label=r["method"])
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_ylabel("WikiText-2 perplexity")
    axes.set_title(f"{int(round(sparsity * 100))}% sparsity: quality per unit of compute")
    axes.grid(True, which="both", alpha=0.3)
    axes.set_xlabel("wall seconds of the prune (2 CPU cores; ELSA's steps marked)")
    axes.legend(fontsize=6, loc="upper right")  # magnitude sits top left, the ELSA points bottom right
    return _save(figure, out_png)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--results", nargs="+", default=["bench/results"], help="results folders; written into the first"
    )
    parser.add_argument("--sparsity", type=float, default=0.8)
    args = parser.parse_args(argv)
    out = Path(args.results[0])
    results = merged_results([Path(folder) for folder in args.results])
    dense = next((r[METRIC] for r in results if r["method"] == "dense" and "error" not in r), None)
    rows = curve_rows(results, args.sparsity)
    text = table(rows, dense)
    name = f"budget_curve-{round(args.sparsity * 100)}"
    (out / f"{name}.md").write_text(f"# Budget curve at {args.sparsity:.0%}\n\n{text}\n")
    plot(rows, out / f"{name}.png", args.sparsity)
    print(text)


if __name__ == "__main__":
    main()
