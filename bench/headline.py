"""The README's headline table: both bench models side by side, perplexity on two texts and
zero-shot accuracy, read from the committed bench results (nothing is run).

Per model the dense model, then per sparsity the best one-shot method (lowest WikiText-2
perplexity among magnitude, Wanda and SparseGPT), ELSA on the defaults at 32 steps, and ELSA's
best run within one hour of the reference machine (lowest WikiText-2 perplexity). Each cell comes
from the model's zero-shot results directory where it was measured there (those carry the
accuracies), else from its perplexity-only directory; the last column names the file, whose
records carry each cell's command.

    python bench/headline.py            # prints the table and writes bench/results/headline.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from bench_report import read_results, record_steps  # noqa: E402

MODELS = {  # model -> results directories, the zero-shot one first
    "smollm2-135m": ("bench/results-zeroshot", "bench/results"),
    "gemma3-270m": ("bench/results-gemma3-zeroshot", "bench/results-gemma3"),
}
ONE_SHOT = ("magnitude", "wanda", "sparsegpt")
WIKI, SOTU = "ppl_wikitext2-bundled", "ppl_sotu"
HOUR_S = 3600.0
SOLVED_TASKS = ("arc_easy", "hellaswag")  # the tasks both dense models clearly solve (README)


def _cells(dirs: tuple[str, ...]) -> list[tuple[str, dict]]:
    """(directory, record) for every finished cell, the zero-shot directory's first."""
    return [
        (d, r) for d in dirs for r in read_results(REPO / d) if "error" not in r and r.get("windows", "bos") == "bos"
    ]


def _first(cells, **match) -> tuple[str, dict] | None:
    return next(((d, r) for d, r in cells if all(r.get(k) == v for k, v in match.items())), None)


def pick_rows(cells: list[tuple[str, dict]], sparsity: float) -> list[tuple[str, str, dict]]:
    """(label, directory, record) for the best one-shot cell, ELSA at 32 steps and ELSA's best
    run within the hour, at one sparsity; a row is left out where no cell was measured."""
    rows = []
    one_shot = [(d, r) for d, r in cells if r["method"] in ONE_SHOT and r["sparsity"] == sparsity and WIKI in r]
    if one_shot:
        best = min(one_shot, key=lambda c: c[1][WIKI])[1]["method"]
        d, r = _first(cells, method=best, sparsity=sparsity)
        rows.append((best, d, r))
    elsa = [(d, r) for d, r in cells if r["method"] == "elsa" and r["sparsity"] == sparsity]
    short = next(((d, r) for d, r in elsa if record_steps(r) == 32), None)
    if short:
        rows.append(("ELSA, 32 steps", *short))
    longer = [(d, r) for d, r in elsa if (record_steps(r) or 0) > 32 and r["prune_s"] <= HOUR_S]
    if longer:  # the zero-shot directory's best run (it has accuracies), else the best anywhere
        top = min(longer, key=lambda c: (c[0] != cells[0][0], c[1].get(WIKI, float("inf"))))
        rows.append((f"ELSA, {record_steps(top[1])} steps", *top))
    return rows


def _ppl(record: dict, metric: str, base: dict | None) -> str:
    if metric not in record:
        return "-"
    ratio = f" ({record[metric] / base[metric]:.2f}x)" if base and metric in base and base is not record else ""
    return f"{record[metric]:,.1f}{ratio}"


def _acc(record: dict, key: str) -> str:
    return f"{record[key]:.3f}" if key in record else "-"


def table(sparsities: tuple[float, ...]) -> str:
    lines = [
        "| model | sparsity | method | WikiText-2 ppl (/ one-shot) | sotu ppl (/ one-shot) | ARC-e | HellaSwag "
        "| mean of 7 | prune s | cell |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, dirs in MODELS.items():
        cells = _cells(dirs)
        dense = _first(cells, method="dense")
        if dense:
            d, r = dense
            lines.append(_line(model, "0%", "dense", d, r, None))
        for sparsity in sparsities:
            rows = pick_rows(cells, sparsity)
            base = rows[0][2] if rows and rows[0][0] in ONE_SHOT else None
            lines += [_line(model, f"{sparsity:.0%}", label, d, r, base) for label, d, r in rows]
    return "\n".join(lines) + "\n"


def _line(model: str, sparsity: str, label: str, directory: str, r: dict, base: dict | None) -> str:
    accs = " | ".join(_acc(r, f"acc_{t}") for t in SOLVED_TASKS)
    mean = _acc(r, "zero_shot_avg")
    name = {"sparsegpt": "SparseGPT", "wanda": "Wanda", "magnitude": "magnitude"}.get(label, label)
    cell = f"{directory}/results.json"
    prune = "-" if r["method"] == "dense" else f"{r['prune_s']:,.0f}"
    return (
        f"| {model} | {sparsity} | {name} | {_ppl(r, WIKI, base)} | {_ppl(r, SOTU, base)} | {accs} | {mean} "
        f"| {prune} | {cell} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.7, 0.8, 0.9])
    parser.add_argument("--out", default="bench/results/headline.md")
    args = parser.parse_args(argv)
    text = table(tuple(args.sparsities))
    print(text, end="")
    (REPO / args.out).write_text(text)


if __name__ == "__main__":
    main()
