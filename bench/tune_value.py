"""What a search buys at equal compute: a search, then three ELSA cells side by side.

    python bench/tune_value.py --model smollm2-135m --sparsity 0.8 --budget 300 --trial-steps 64 --trials 8

1. ``elsa tune`` at ``--trial-steps`` a trial (its first trial is the budget rule's own setting,
   tune/seed.py), timed from the command to its end: the search's compute.
2. Three cells of the bench (``bench/run_bench.py``, each its own process, one after another):
   (a) the defaults at the budget B (``--budget`` steps); (b) the search's best setting at B
   (``elsa-preset``, as ``elsa prune --preset``); (c) the defaults at B plus the search's compute
   spent on more steps instead (its wall time over (a)'s seconds a training step).
3. ``OUT/tune_value.json`` and ``.md``: the search (trials and how they ended, the rule's and the
   best trial's projected held-out loss, wall time) and the three cells (WikiText-2 and sotu
   perplexity, final projected held-out loss, wall time), with every command.

Whether searching pays is (b) against (c): the same compute, spent on a search or on steps.
Run it alone on the machine: the extra steps of (c) follow the search's wall time.

``--promote`` then writes the best setting into ``elsa/tables/tuned.yaml`` (``elsa prune --preset
tuned``) with its provenance, but only where (b) beats (a) on WikiText-2 perplexity: a setting that
wins the search's short trials and loses at the budget is not shipped. ``--cell-seeds 0 1 2`` runs
(a) and (b) at each seed (seed n > 0 in ``OUT/seed-n``) and compares their means: the seed alone
moves a 300-step cell by about 6% (bench/results/NOTES.md, 2026-12-06), more than settings differ.
Where the rule's own setting won the search, the entry has no overrides and says so.
``--search-only`` stops after the search.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _run(command: list[str]) -> float:
    """Run ``command`` in the repository, its output shown; returns its wall time."""
    print("[tune-value] " + " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    return time.perf_counter() - started


def search(args, out: Path) -> dict:
    """The search, its wall time and what MLflow's parent run recorded of it; read back from
    ``out/search.json`` when an earlier run of this script finished it (a cell failed after it)."""
    from pipelines.records import tracking
    from pipelines.run.storage import run_storage
    from tune import state
    from tune.one_sparsity import sparsity_key

    record = out / "search.json"
    if record.is_file():
        return json.loads(record.read_text())
    presets = out / f"presets-{args.model}-{args.sparsity:g}.yaml"
    root = state.join(run_storage(None), args.name)
    resumed = state.read(root) is not None  # an interrupted search: continued, its wall time partial
    command = [sys.executable, "-m", "cli", "tune", "--name", args.name, "--preset-out", str(presets)]
    command += ["--tracking-uri", args.tracking_uri]
    if resumed:
        command += ["--resume"]
    else:
        command += ["--model", args.model, "--sparsity", str(args.sparsity), "--trials", str(args.trials)]
        command += ["--steps", str(args.trial_steps), *args.tune_args]
    wall_s = _run(command)
    entry = next(e for e in yaml.safe_load(presets.read_text())["presets"] if float(e["sparsity"]) == args.sparsity)
    parent_id = state.read(root)["sparsities"][sparsity_key(args.sparsity)]["parent_run_id"]
    parent = tracking.client(args.tracking_uri).get_run(parent_id)
    found = {
        "command": " ".join(["python", *command[1:]]),
        "wall_s": wall_s,
        "trial_steps": args.trial_steps,
        "resumed": resumed,
        "preset_file": str(presets),
        "best": {k: entry[k] for k in ("config", "val_loss_projected", "trial_id", "mlflow_run_id")},
        "seeds": entry.get("seeds", []),
        "parent_run_id": parent_id,
        "trials": {k: v for k, v in parent.data.metrics.items() if k.startswith("trials_")},
        # one start, or one per searched start setting (init_s/allocation:uniform, tune/starts.py)
        "init_s": sum(v for k, v in parent.data.metrics.items() if k == "init_s" or k.startswith("init_s/")) or None,
    }
    record.write_text(json.dumps(found, indent=1, default=str))
    return found


def cell(args, out: Path, method: str, steps: int, preset: str | None = None, seed: int = 0) -> dict:
    """One bench cell (run_bench.py skips it when ``out`` holds it already), and its record; a seed
    other than 0 in its own subfolder ``seed-<n>`` (a bench folder holds one seed's cells)."""
    out = out if seed == 0 else out / f"seed-{seed}"
    command = [sys.executable, "bench/run_bench.py", "--model", args.model, "--out", str(out)]
    command += ["--methods", method, "--sparsities", str(args.sparsity), "--steps", str(steps)]
    command += ["--tracking-uri", args.tracking_uri, *(["--preset", preset] if preset else [])]
    command += ["--seed", str(seed)] if seed else []
    _run(command)
    records = json.loads((out / "results.json").read_text())["results"]
    found = [r for r in records if r["method"] == method and r["sparsity"] == args.sparsity and r.get("steps") == steps]
    if not found or "error" in found[-1]:
        raise SystemExit(f"{method} at {steps} steps failed: see {out / 'results.md'}")
    return {**found[-1], "bench_command": " ".join(["python", *command[1:]])}


def run_cells(args, out: Path, found: dict) -> dict:
    """Cells (a) and (b) at each of ``--cell-seeds``, and (c) at the first seed unless ``--skip-longer``."""
    budget, cells, seed_pairs = args.budget, {}, {}
    for seed in args.cell_seeds:
        tag = "" if seed == args.cell_seeds[0] else f", seed {seed}"
        names = (f"(a) defaults, B = {budget}{tag}", f"(b) best of the search, B = {budget}{tag}")
        cells[names[0]] = cell(args, out, "elsa", budget, seed=seed)
        cells[names[1]] = cell(args, out, "elsa-preset", budget, found["preset_file"], seed=seed)
        seed_pairs[seed] = names
        if not tag and not args.skip_longer:
            extra = round(found["wall_s"] / seconds_a_step(cells[names[0]]))
            longer = cell(args, out, "elsa", budget + extra, seed=seed)
            cells[f"(c) defaults, B + the search's compute ({extra} steps)"] = longer
    return {"model": args.model, "sparsity": args.sparsity, "search": found, "cells": cells, "seed_pairs": seed_pairs}


def seconds_a_step(record: dict) -> float:
    """Training seconds a step of a cell: its prune time without the one-shot start."""
    return (record["prune_s"] - record.get("init_s", 0.0)) / record["steps"]


def summary_lines(result: dict) -> list[str]:
    found = result["search"]
    lines = [
        f"# Search value: {result['model']} at {result['sparsity']:g}",
        "",
        f"Search: `{found['command']}` in {found['wall_s']:.0f} s"
        + (" (resumed: the last part only)" if found.get("resumed") else "")
        + f" (shared start {found['init_s'] or 0:.0f} s); "
        f"trials {json.dumps(found['trials'])}; MLflow parent run {found['parent_run_id']}.",
        "",
        "| seed / best | projected held-out loss at the trial budget |",
        "|---|---|",
        *[f"| seed {s['source']} ({s['outcome']}) | {s['val_loss_projected']} |" for s in found["seeds"]],
        f"| best trial {found['best']['trial_id']}: {json.dumps(found['best']['config'])} | "
        f"{found['best']['val_loss_projected']:.4f} |",
        "",
        "| cell | steps | lr | WikiText-2 | sotu | held-out (projected) | start's held-out | prune s "
        "| compute with the search, s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, record in result["cells"].items():
        compute = record["prune_s"] + (found["wall_s"] if name.startswith("(b)") else 0.0)
        held_out = record.get("final_val_loss_projected", float("nan"))
        lines.append(
            f"| {name} | {record['steps']} | {record.get('lr')} | {record['ppl_wikitext2-bundled']:.2f} | "
            f"{record.get('ppl_sotu', float('nan')):.2f} | {held_out:.4f} | "
            f"{record.get('init_val_loss', float('nan')):.4f} | {record['prune_s']:.0f} | {compute:.0f} |"
        )
    cells, pairs = list(result["cells"].values()), cell_pairs(result)
    if len(cells) > 1 and (problem := pairs_problem(pairs) or machine_mismatch(*cells)):
        lines += ["", f"**{problem}**"]
    if len(pairs) > 1 and (means := measured_side_by_side(pairs, None)):
        shown = "; ".join(f"{name} {m['defaults']:.4g} against {m['tuned']:.4g}" for name, m in means.items())
        lines += ["", f"Means over the {len(pairs)} seeds, (a) against (b): {shown}."]
    lines += ["", "Commands:", "", *[f"- `{r['bench_command']}`" for r in result["cells"].values()]]
    return lines


TUNED_TABLE = REPO / "elsa" / "tables" / "tuned.yaml"


def machine_mismatch(*cells: dict) -> str | None:
    """Why cells are not comparable for their machines, or None: each records its CPU and threads
    (bench/run_one.py; older cells do not, and pass). The Gemma-3 cells run 1.8x faster a step
    on the Intel machine than on the AMD one, and a 90% start moves by 0.7 in held-out loss."""
    machines = {(r["cpu"], r.get("torch_threads")) for r in cells if "cpu" in r}
    if len(machines) < 2:
        return None
    named = " against ".join(f"{cpu} with {threads} threads" for cpu, threads in sorted(machines, key=str))
    return f"cells ran on different machines ({named}); rerun them on one machine (run_bench.py --force)"


def start_mismatch(defaults: dict, tuned: dict) -> str | None:
    """Why (a) and (b) are not a fair pair, or None. Where the search's setting leaves the one-shot
    start alone, both cells must begin from the same start; at 80-90% SparseGPT's solution moves
    with rounding (another CPU or thread count: held-out 8.36 to 9.47 at 90% on SmolLM2), so cells
    run on different machines compare their starts, not their settings. Cells that record their
    machine are compared only within one, whatever the start."""
    from elsa.config import PruneConfig
    from tune.starts import START_FIELDS

    if problem := machine_mismatch(defaults, tuned):
        return problem
    if "config" not in defaults or "config" not in tuned:
        return None
    resolved = [PruneConfig(**record["config"]).model_dump() for record in (defaults, tuned)]
    if any(resolved[0][k] != resolved[1][k] for k in START_FIELDS):
        return None  # the setting changes the start itself (e.g. the allocation): starts differ by design
    starts = [record.get("init_val_loss") for record in (defaults, tuned)]
    if None in starts or abs(starts[0] - starts[1]) < 1e-6:
        return None
    return (
        f"cells (a) and (b) began from different one-shot starts (held-out {starts[0]:.4f} against "
        f"{starts[1]:.4f}) although the setting leaves the start alone: they ran on different machines "
        "or thread counts; rerun both on one machine (run_bench.py --force) before comparing them"
    )


def winning_seed(found: dict) -> dict | None:
    """The seed trial (tune/seed.py) whose projected loss is the search's best, if one is."""
    best = found["best"]["val_loss_projected"]
    return next((s for s in found["seeds"] if s["outcome"] == "completed" and s["val_loss_projected"] == best), None)


def rule_won(found: dict) -> bool:
    """Whether the search's best trial was the budget rule's own seed (tune/seed.py)."""
    seed = winning_seed(found)
    return seed is not None and seed["kind"] == "rule"


MEASURES = {"wikitext2": "ppl_wikitext2-bundled", "sotu": "ppl_sotu", "held_out": "final_val_loss_projected"}


def cell_pairs(result: dict) -> list[tuple[dict, dict]]:
    """Cells (a) and (b) of each seed: ``seed_pairs`` names them, else the first two cells are the pair."""
    cells = result["cells"]
    names = result.get("seed_pairs") or {0: list(cells)[:2]}
    return [(cells[a], cells[b]) for a, b in names.values()]


def longer_cells(result: dict) -> list[dict]:
    """Cell (c), where it ran: the cell that is in no seed's pair."""
    paired = {id(c) for pair in cell_pairs(result) for c in pair}
    return [c for c in result["cells"].values() if id(c) not in paired]


def measured_side_by_side(pairs: list[tuple[dict, dict]], longer: dict | None) -> dict:
    """Each measure every (a) and (b) cell holds: their means over the seeds, with (c)'s value (None
    when not run) and, for several seeds, each seed's values. Promotion reads WikiText-2 alone;
    the table shows the out-of-domain text and held-out loss beside it."""
    measured = {}
    for name, key in MEASURES.items():
        if not all(key in cell for pair in pairs for cell in pair):
            continue
        defaults, tuned = ([pair[i][key] for pair in pairs] for i in (0, 1))
        measured[name] = {
            "defaults": statistics.mean(defaults),
            "tuned": statistics.mean(tuned),
            "defaults_longer": longer.get(key) if longer else None,
            **({"per_seed": {"defaults": defaults, "tuned": tuned}} if len(pairs) > 1 else {}),
        }
    return measured


def pairs_problem(pairs: list[tuple[dict, dict]]) -> str | None:
    """Why some seed's (a) and (b) are not a fair pair (``start_mismatch``), or None."""
    return next((problem for pair in pairs if (problem := start_mismatch(*pair))), None)


def tuned_entry(result: dict, out: Path) -> dict | None:
    """The bundled table's entry for the search's best setting, with what found and measured it;
    an empty config where the rule's own setting won, or where the best lost to the defaults at
    the budget (``rejected`` then keeps it, with the cells: ``--preset tuned`` runs the rule and
    says why); None when the cells were not run (``--search-only``) or began from different
    starts (``start_mismatch``)."""
    found = result["search"]
    won = rule_won(found)
    entry = {
        "model": result["model"],
        "sparsity": result["sparsity"],
        "config": {} if won else found["best"]["config"],
        "search": found["command"],
        "mlflow_parent_run_id": found["parent_run_id"],
        "trials": found["trials"],
        "trial_steps": found["trial_steps"],
        "search_s": round(found["wall_s"]),
        "val_loss_projected": found["best"]["val_loss_projected"],
        "seeds": found["seeds"],
    }
    if won:  # the entry says so; the rule's setting at B is cell (a) itself
        return entry
    if not result["cells"]:  # --search-only: a sampled winner enters the table only once measured at B
        return None
    pairs, longer = cell_pairs(result), longer_cells(result)  # (c) absent with --skip-longer
    if pairs_problem(pairs):
        return None
    longer = [] if machine_mismatch(pairs[0][0], *longer) else longer  # (c) of another machine: not shown
    measured = measured_side_by_side(pairs, longer[0] if longer else None)
    beats = measured["wikitext2"]["tuned"] < measured["wikitext2"]["defaults"]  # means over the seeds
    rejected = {} if beats else {"config": {}, "rejected": entry["config"]}
    seeds = {"cell_seeds": [p[0].get("config", {}).get("seed", 0) for p in pairs]} if len(pairs) > 1 else {}
    return {
        **entry,
        **rejected,
        "measured": {
            "budget": pairs[0][1]["steps"],
            **seeds,
            **measured,
            "defaults_longer_steps": longer[0]["steps"] if longer else None,
            "results": str(out.relative_to(REPO) if out.is_relative_to(REPO) else out),
        },
    }


def promote(result: dict, out: Path, table: Path = TUNED_TABLE) -> str:
    """Merge the entry into the bundled table, its comment header kept; says what it did."""
    from tune.results import merge_entries

    entry = tuned_entry(result, out)
    if entry is None and not result["cells"]:
        seed = winning_seed(result["search"])
        winner = f"the rule's seed {seed['source']}" if seed else "a sampled setting"
        return (
            f"not promoted: {winner} won the search, and the cells at the budget were not run; "
            "run this script again without --search-only (the search is read back) to measure it"
        )
    if entry is None:
        return f"not promoted: {pairs_problem(cell_pairs(result))}"
    header = "".join(line for line in table.read_text().splitlines(keepends=True) if line.startswith("#"))
    entries = merge_entries(table, [entry])
    table.write_text(header + yaml.safe_dump({"presets": entries}, sort_keys=False))
    if "rejected" in entry:
        return f"the search's best lost to the defaults at the budget: the rule kept, recorded in {table}"
    if not entry["config"]:
        return f"the budget rule won the search; recorded in {table} as an entry without overrides"
    return f"promoted into {table}: {entry['model']} at {entry['sparsity']:g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--budget", type=int, default=300, help="B: steps of the cells compared")
    parser.add_argument("--trial-steps", type=int, default=64, help="steps a trial (the search's fidelity)")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument(
        "--name", default=None, help="search name (default: tv-<model>-<sparsity>-<trial steps>x<trials>)"
    )
    parser.add_argument("--out", default="bench/results-tune")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--promote", action="store_true", help="write the winner into elsa/tables/tuned.yaml")
    parser.add_argument("--search-only", action="store_true", help="stop after the search (no cells)")
    parser.add_argument(
        "--skip-longer", action="store_true", help="cells (a) and (b) only: decide promotion without (c)'s long run"
    )
    parser.add_argument(
        "--cell-seeds",
        nargs="+",
        type=int,
        default=[0],
        help="seeds of cells (a) and (b): promotion compares their means (the seed moves a 300-step cell by ~6%%)",
    )
    parser.add_argument("tune_args", nargs="*", help="more elsa tune flags, after --")
    args = parser.parse_args(argv)
    from pipelines.records import tracking

    args.tracking_uri = tracking.resolve_tracking_uri(args.tracking_uri)
    args.name = args.name or f"tv-{args.model}-{args.sparsity:g}-{args.trial_steps}x{args.trials}"
    out = Path(args.out) / f"{args.model}-{args.sparsity:g}"
    out.mkdir(parents=True, exist_ok=True)
    found = search(args, out)
    if args.search_only or rule_won(found):  # the rule won: (b) would be (a) again
        result = {"model": args.model, "sparsity": args.sparsity, "search": found, "cells": {}}
        print(json.dumps(found, indent=1, default=str))
        if args.promote:
            print(promote(result, out))
        return
    result = run_cells(args, out, found)
    (out / "tune_value.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "tune_value.md").write_text("\n".join(summary_lines(result)) + "\n")
    print((out / "tune_value.md").read_text())
    if args.promote:
        print(promote(result, out))


if __name__ == "__main__":
    main()
