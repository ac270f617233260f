"""The real-model benchmark: dense, magnitude, Wanda, SparseGPT and ELSA (both penalty modes).

Same model, same calibration text (bundled enwiki sample, or ``--data`` for every cell), same
evaluation windows (bundled WikiText-2 test, never used for calibration), sparsity 50-90%. Each cell runs in its own
process (``bench/run_one.py``) so its wall time and peak memory are its own; each is an MLflow
run of one experiment, so ``elsa compare --experiment bench`` shows the sweep. Results
accumulate in ``results.json`` and a finished cell is skipped on a rerun (``--force`` redoes it).

    python bench/run_bench.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from bench_report import read_results, record_steps, write_reports  # noqa: E402

from elsa.config import PruneConfig  # noqa: E402

METHODS = ("dense", "magnitude", "wanda", "sparsegpt", "elsa", "elsa-preset", "elsa-coupled", "elsa-decoupled")


def cell_config(method: str, sparsity: float, args) -> dict:
    """PruneConfig fields of one cell.

    ``elsa`` sets nothing but the budget (steps) and the measurement settings: what a user gets
    from ``elsa prune --sparsity S --steps N`` (elsa/budget.py); ``elsa-preset`` adds the entry of
    ``--preset`` (``paper`` or a file ``elsa tune`` wrote), as ``elsa prune --preset``. ``elsa-coupled`` takes the
    paper's Table 5 settings, ``elsa-decoupled`` the hand-chosen ones of the 150-step sweep, both
    from the dense model (init none).
    """
    base = {
        "model": args.model,
        "seqlen": args.seqlen,
        "seed": args.seed,
        "data": args.data or PruneConfig.model_fields["data"].default,
        "windows": args.windows,
    }
    if method in ("dense", "magnitude", "wanda", "sparsegpt"):
        return {**base, "method": method, "sparsity": sparsity, "calib_blocks": args.calib_blocks}
    elsa = {
        **base,
        "method": "elsa",
        "sparsity": sparsity,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "eval_interval": args.eval_interval,
        "val_blocks": args.val_blocks,
    }
    if method == "elsa":
        return {**elsa, "calib_blocks": args.calib_blocks}
    if method == "elsa-preset":
        from elsa.presets import preset_overrides

        if not args.preset:
            raise SystemExit("--methods elsa-preset needs --preset (paper, or a preset file from elsa tune)")
        # the bench's budget wins over the preset's, as flags win in `elsa prune --preset`
        return {**preset_overrides(args.preset, args.model, sparsity), **elsa, "calib_blocks": args.calib_blocks}
    elsa.update(
        init="none", interval=args.interval, projection="fisher", bf16=False, allocation="uniform"
    )  # as first run
    if method == "elsa-coupled":
        from elsa.presets import paper_preset

        paper = paper_preset(args.model, sparsity)
        keep = ("lr", "lmda", "lmda_final", "lmda_schedule")
        return {
            **elsa,
            **{k: paper[k] for k in keep if k in paper},
            "penalty": "coupled",
            "fisher_source": args.coupled_fisher_source,
        }
    return {
        **elsa,
        "penalty": "decoupled",
        "lr": args.decoupled_lr,
        "rho": args.rho,
        "rho_final": args.rho_final,
        "rho_schedule": args.rho_schedule,
        "lmda": 0.0,
    }


def run_cell(method: str, sparsity: float, args, uri: str, experiment: str) -> dict:
    from pipelines.records import tracking

    cfg = cell_config(method, sparsity, args)
    penalty = cfg.get("penalty") if cfg["method"] == "elsa" else None
    tags = {"bench": "1"}
    params = {
        **cfg,
        "method": "elsa" if method.startswith("elsa") else method,
        "penalty": penalty,
        "sparsity": 0.0 if method == "dense" else sparsity,
    }
    run_id = tracking.start_run(
        uri, experiment, params, run_name=f"{method}-{sparsity}-{cfg.get('steps', 0)}", tags=tags
    )
    out = Path(args.out) / "cells" / f"{cell_name(method, sparsity, args.steps, args.windows)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = _cell_command(cfg, args, {"uri": uri, "run_id": run_id}, out)
    started = time.perf_counter()
    proc = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    if proc.returncode != 0:
        tracking.client(uri).set_tag(run_id, "error", proc.stderr[-4000:])
        tracking.end_run(uri, run_id, "FAILED")
        return {
            "method": method,
            "sparsity": sparsity,
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed",
        }
    record = json.loads(out.read_text())
    record.update(
        method=method,
        sparsity=sparsity,
        total_s=time.perf_counter() - started,
        config=cfg,
        mlflow_run_id=run_id,
        command=" ".join(["python", "bench/run_bench.py", *sys.argv[1:]]),
    )
    tracking.log_metrics(
        uri,
        run_id,
        {
            k: v
            for k, v in record.items()
            if k.startswith(("ppl_", "acc_")) or k in ("prune_s", "peak_rss_mb", "zero_shot_avg")
        },
    )
    tracking.end_run(uri, run_id, "FINISHED")
    return record


def _cell_command(cfg: dict, args, tracking_info: dict, out: Path) -> list[str]:
    """The command line of one cell's own process (bench/run_one.py)."""
    zero_shot = ["--lm-eval-tasks", *args.lm_eval_tasks] if args.lm_eval_tasks else []
    zero_shot += ["--lm-eval-limit", str(args.lm_eval_limit)] if args.lm_eval_limit else []
    return [
        sys.executable,
        str(REPO / "bench" / "run_one.py"),
        *("--config", json.dumps(cfg), "--eval-datasets", *args.eval_datasets, *zero_shot),
        *("--eval-seqlen", str(args.eval_seqlen), "--eval-windows", str(args.eval_windows)),
        *("--tracking", json.dumps(tracking_info), "--out", str(out)),
    ]


def _windows_suffix(windows: str) -> str:
    """Cells on the classic window protocol are files of their own; the default's keep their names."""
    return "" if windows == "bos" else f"-{windows}"


def cell_name(method: str, sparsity: float, steps: int | None, windows: str = "bos") -> str:
    """The stem of a cell's file under ``cells/``: steps only for the cells that take a step budget."""
    budget = f"-{steps}" if method in ("elsa", "elsa-preset") else ""
    return f"{method}-{sparsity}{budget}{_windows_suffix(windows)}"


def same_cell(record: dict, method: str, sparsity: float, steps: int, windows: str = "bos") -> bool:
    """Whether ``record`` is the cell (method, sparsity, window protocol), for ELSA cells also (steps).

    Records from before the protocol was a setting were all "bos" (identical on SmolLM2)."""
    if record["method"] != method or record["sparsity"] != sparsity or record.get("windows", "bos") != windows:
        return False
    return not method.startswith("elsa") or record_steps(record) == steps


def other_setting(records: list[dict], method: str, key: str, wanted, older):
    """The value of config ``key`` (``seed``, ``data``) of a finished cell in ``records`` that is
    not ``wanted``, or None; ``older`` stands for cells from before the key was recorded. Dense
    has neither a seed nor a calibration text.

    A folder holds one seed's and one calibration text's cells (cell files are named without
    them): a rerun with another ``--seed`` or ``--data`` would otherwise skip the finished cell
    and report it as its own."""
    if method == "dense":
        return None
    return next((v for r in records if (v := r.get("config", {}).get(key, older)) != wanted), None)


def _same_preset(record: dict, args) -> bool:
    """An elsa-preset cell is done only with the settings of today's ``--preset`` entry."""
    if record["method"] != "elsa-preset":
        return True
    wanted = cell_config("elsa-preset", record["sparsity"], args)
    return record.get("config") == json.loads(json.dumps(wanted))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--calib-blocks", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64, help="ELSA steps per run")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--interval", type=int, default=32, help="elsa-coupled / elsa-decoupled cells only")
    parser.add_argument("--eval-interval", type=int, default=32)
    parser.add_argument("--val-blocks", type=int, default=4)
    # Decoupled defaults, chosen on held-out enwiki blocks only (bench/results/NOTES.md): lr 1.2e-3
    # from a search at 70% / 64 steps (bench/spaces/decoupled.yaml); rho rising linearly
    # 0.005 -> 0.05, which beat that search's 0.0011 -> 0.011 at 80% / 150 steps (5.08 vs 5.36).
    parser.add_argument("--decoupled-lr", type=float, default=1.2e-3)
    parser.add_argument("--rho", type=float, default=0.005, help="decoupled rho at step 0")
    parser.add_argument("--rho-final", type=float, default=0.05, help="decoupled rho at the last step")
    parser.add_argument("--rho-schedule", default="linear")
    # Coupled mode's objective-aware score: Adam's v holds the penalty's own gradient on short runs
    # and flips the mask back every z-update (elsa/optim/admm.py), so the bench ranks by the loss's EMA.
    parser.add_argument("--coupled-fisher-source", choices=("adam", "loss"), default="loss")
    from elsa.config import EVAL_SEQLEN

    parser.add_argument("--eval-seqlen", type=int, default=EVAL_SEQLEN)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument(
        "--eval-datasets",
        nargs="+",
        default=["wikitext2-bundled", "sotu"],
        help="perplexity texts: WikiText-2 (the calibration's domain) and State of the Union (another)",
    )
    parser.add_argument("--lm-eval-tasks", nargs="*", default=[], help="zero-shot tasks, e.g. the paper's seven")
    parser.add_argument("--lm-eval-limit", type=int, default=None, help="examples per zero-shot task")
    parser.add_argument("--preset", default=None, help="elsa-preset cells: 'paper' or a preset file from elsa tune")
    parser.add_argument("--windows", choices=("bos", "classic"), default="bos", help="protocol: elsa/text/data.py")
    parser.add_argument(
        "--data", default=None, help="calibration and training text of every cell (default: elsa's, enwiki-sample)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--experiment", default="bench")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--force", action="store_true", help="rerun cells already in results.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    from pipelines.records import tracking

    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_reachable(uri)
    out_dir = Path(args.out)
    metric = "ppl_wikitext2-bundled"
    cells = [("dense", 0.0)] if "dense" in args.methods else []
    cells += [(m, s) for s in args.sparsities for m in args.methods if m != "dense"]
    for method, sparsity in cells:
        done = [
            r
            for r in read_results(out_dir)
            if same_cell(r, method, sparsity, args.steps, args.windows) and "error" not in r and _same_preset(r, args)
        ]
        data = cell_config(method, sparsity, args)["data"]
        for key, wanted, older in (("seed", args.seed, 0), ("data", data, "enwiki-sample")):
            if (found := other_setting(done, method, key, wanted, older)) is not None:
                raise SystemExit(
                    f"{out_dir} holds {method} at {sparsity:g} run with {key} {found}, not --{key} {wanted}: "
                    f"give each {key} its own --out folder"
                )
        if done and not args.force:
            continue
        print(f"[bench] {method} @ {sparsity:.1f} ...", flush=True)
        record = run_cell(method, sparsity, args, uri, args.experiment)
        # Re-read before writing: another runner on other cells may have added its own meanwhile.
        results = [r for r in read_results(out_dir) if not same_cell(r, method, sparsity, args.steps, args.windows)]
        results.append(record)
        shown = (
            f"ppl {record[metric]:.2f}, {record['prune_s']:.0f} s"
            if "error" not in record
            else f"FAILED: {record['error']}"
        )
        print(f"[bench] {method} @ {sparsity:.1f}: {shown}", flush=True)
        write_reports(results, out_dir, metric, args, METHODS)
    write_reports(read_results(out_dir), out_dir, metric, args, METHODS)
    print((out_dir / "results.md").read_text())


if __name__ == "__main__":
    main()
