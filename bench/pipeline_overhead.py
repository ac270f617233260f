"""What the Ray Train pipeline costs per step against the same loop run bare in one process.

The same config runs twice: bare, through ``elsa.api.prune_model`` in this process, and as
``elsa prune --workers 1 --no-eval`` (local Ray, a Ray Train worker, MLflow logging every step).
Two figures per run, each a median over the steps that do no z/u-update or validation:
- ``tokens_per_s``: the loop's own measure of one training step (forward, backward, optimiser);
- ``step_wall_s``: the time between consecutive step-end metrics, i.e. the step plus everything
  the pipeline adds around it (metric logging, Ray's reporting). Bare, the time of the log
  callback; under Ray, the timestamps MLflow recorded for the rank-0 worker's step metrics.

    python bench/pipeline_overhead.py                  # writes bench/results/pipeline_overhead.json
    python bench/pipeline_overhead.py --steps 40 --model smollm2-135m
    python bench/pipeline_overhead.py --cpus-per-worker 1 --out /tmp/one_cpu.json   # Ray's default

Run it on a quiet machine: both runs take turns with nothing else, but not interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from elsa.config import make_config

REPO = Path(__file__).resolve().parents[1]


def plain_steps(history: list[dict], interval: int, eval_interval: int, skip_first: int) -> list[int]:
    """Steps that ran no z/u-update and no validation (and are past the warm-up ones)."""
    return [h["step"] for h in history if h["step"] > skip_first and h["step"] % interval and h["step"] % eval_interval]


def deltas(times: dict[int, float], steps: list[int]) -> list[float]:
    """Wall time of step s = time(s) - time(s - 1), for the steps whose predecessor was logged."""
    return [times[s] - times[s - 1] for s in steps if s - 1 in times and s in times]


def run_bare(overrides: dict) -> dict:
    from elsa.api import prune_model

    cfg = make_config(overrides)
    history: list[dict] = []

    def log(metrics: dict, step: int) -> None:
        history.append({"step": step, "t": time.time(), **metrics})

    prune_model(cfg, log=log)
    return {"history": history}


def run_ray(overrides: dict, work: Path, cpus_per_worker: float | None = None) -> dict:
    """``elsa prune`` in a subprocess; its step metrics read back from the MLflow store."""
    import mlflow

    db = work / "mlflow.db"
    flags = []
    for key, value in overrides.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    command = [
        sys.executable,
        "-m",
        "cli",
        "prune",
        *flags,
        "--workers",
        "1",
        "--no-eval",
        "--output",
        str(work / "out"),
        "--tracking-uri",
        f"sqlite:///{db}",
        "--experiment",
        "overhead",
        "--storage-path",
        str(work / "ray"),
    ]
    if cpus_per_worker:
        command += ["--cpus-per-worker", str(cpus_per_worker)]
    started = time.time()
    proc = subprocess.run(command, cwd=work, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"elsa prune failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.search_runs([client.get_experiment_by_name("overhead").experiment_id])[0]
    by_step: dict[int, dict] = {}
    for name in ("train_loss", "tokens_per_s"):
        for m in client.get_metric_history(run.info.run_id, name):
            entry = by_step.setdefault(m.step, {"step": m.step})
            entry[name] = m.value
            if name == "train_loss":
                entry["t"] = m.timestamp / 1000.0
    return {
        "history": sorted(by_step.values(), key=lambda h: h["step"]),
        "run_id": run.info.run_id,
        "command_s": time.time() - started,
    }


def summarise(result: dict, steps: list[int]) -> dict:
    history = {h["step"]: h for h in result["history"]}
    times = {s: h["t"] for s, h in history.items() if "t" in h}
    tps = [history[s]["tokens_per_s"] for s in steps if s in history]
    walls = deltas(times, steps)
    return {
        "median_tokens_per_s": statistics.median(tps),
        "median_step_wall_s": statistics.median(walls),
        "steps_measured": len(tps),
    }


def _parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="pass to elsa prune (default: its own, all local cores for one worker)",
    )
    parser.add_argument("--skip-first", type=int, default=2, help="warm-up steps left out of the medians")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "pipeline_overhead.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)

    overrides = {
        "model": args.model,
        "sparsity": 0.7,
        "steps": args.steps,
        "seqlen": args.seqlen,
        "batch_size": args.batch_size,
        "interval": 8,
        "eval_interval": args.steps,
        "log_interval": 1,
        "val_blocks": 2,
        "penalty": "decoupled",
        "rho": 0.03,
        "lr": 5e-4,
    }
    measured = plain_steps(
        [{"step": s} for s in range(1, args.steps + 1)],
        overrides["interval"],
        overrides["eval_interval"],
        args.skip_first,
    )
    with tempfile.TemporaryDirectory(prefix="elsa-overhead-") as tmp:
        ray_result = run_ray(overrides, Path(tmp), args.cpus_per_worker)
    bare = summarise(run_bare(overrides), measured)
    ray = summarise(ray_result, measured)
    report = {
        "config": overrides,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "bare": bare,
        "ray_train": {
            **ray,
            "cpus_per_worker": args.cpus_per_worker,
            "run_id": ray_result["run_id"],
            "command_s": ray_result["command_s"],
        },
        "ratio_tokens_per_s": ray["median_tokens_per_s"] / bare["median_tokens_per_s"],
        "ratio_step_wall": ray["median_step_wall_s"] / bare["median_step_wall_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"bare:      {bare['median_tokens_per_s']:.0f} tokens/s, {bare['median_step_wall_s']:.2f} s/step")
    print(f"ray train: {ray['median_tokens_per_s']:.0f} tokens/s, {ray['median_step_wall_s']:.2f} s/step")
    print(
        f"ratio (ray / bare): throughput {report['ratio_tokens_per_s']:.3f}, step wall {report['ratio_step_wall']:.3f}"
    )
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
