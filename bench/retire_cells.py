"""Move bench cells that lack a measurement out of a results folder into a history folder.

A results table holds cells measured the same way: when a measurement joins the bench (the
out-of-domain perplexity ``ppl_sotu`` on 2026-12-05), the cells measured before it cannot stand
in the table beside the new ones, and their checkpoints were not kept to measure them again.
They are not deleted either: their records (each with the command that produced it) and their
cell files move to a history folder, whose own ``results.md`` keeps them readable, and the
source folder's reports are rewritten from the cells that stay.

    python bench/retire_cells.py --source bench/results --to bench/results-history/smollm2-135m --missing ppl_sotu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from bench_report import read_results, record_steps, write_reports  # noqa: E402
from run_bench import METHODS, cell_name  # noqa: E402

METRIC = "ppl_wikitext2-bundled"


def _settings(folder: Path) -> argparse.Namespace:
    """The bench settings a folder was last written with (model, evaluation windows): the reports
    of the cells it holds are written with them."""
    return argparse.Namespace(**json.loads((folder / "results.json").read_text())["settings"])


def _cell_file(folder: Path, record: dict) -> Path:
    steps = record_steps(record)
    return (
        folder
        / "cells"
        / f"{cell_name(record['method'], record['sparsity'], steps, record.get('windows', 'bos'))}.json"
    )


def split(records: list[dict], missing: str) -> tuple[list[dict], list[dict]]:
    """(kept, retired): a failed cell stays where it is (it is no measurement of either kind)."""
    kept, retired = [], []
    for r in records:
        (retired if "error" not in r and missing not in r else kept).append(r)
    return kept, retired


def retire(source: Path, to: Path, missing: str) -> list[dict]:
    """Move the cells of ``source`` without ``missing`` to ``to`` (appended to what it holds) and
    rewrite both folders' reports; returns the moved records. A second call moves nothing."""
    kept, retired = split(read_results(source), missing)
    if not retired:
        return []
    settings = _settings(source)
    (to / "cells").mkdir(parents=True, exist_ok=True)
    for record in retired:
        cell = _cell_file(source, record)
        if cell.is_file():
            cell.replace(to / "cells" / cell.name)
    write_reports(read_results(to) + retired, to, METRIC, settings, METHODS)
    write_reports(kept, source, METRIC, settings, METHODS)
    return retired


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="a results folder of bench/run_bench.py")
    parser.add_argument("--to", required=True, help="the history folder the cells move to")
    parser.add_argument("--missing", default="ppl_sotu", help="retire the cells without this measurement")
    args = parser.parse_args(argv)
    source = Path(args.source)
    if not (source / "results.json").is_file():
        raise SystemExit(f"--source {source}: no results.json there; give a folder written by bench/run_bench.py")
    moved = retire(source, Path(args.to), args.missing)
    for r in moved:
        print(f"retired {r['method']} @ {r['sparsity']} ({r.get('steps', '-')} steps): {r.get('command', '-')}")
    print(f"{len(moved)} cells moved to {args.to}; {len(read_results(source))} stay in {source}")


if __name__ == "__main__":
    main()
