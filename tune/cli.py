"""``elsa tune``: the command-line face of :mod:`tune.runner`.

The method-config flags are those of ``elsa prune`` that define a trial's budget and fixed
settings (the searched fields come from ``--space``); anything else goes in ``--config FILE``.
Precedence: PruneConfig defaults < --config < flags < the sampled values of a trial.
"""

from __future__ import annotations

import argparse
import json

from elsa.config import PruneConfig
from elsa.config_files import load_yaml
from pipelines.cli import ADDRESS_HELP, TRACKING_URI_HELP, add_config_options
from pipelines.run.capacity import RESOURCE_TIMEOUT_S
from pipelines.run.preflight import absolute_local_paths
from tune.search import DEFAULT_MAX_VAL_LOSS, SCHEDULERS, SEARCHERS, TRIAL_RETRIES

# PruneConfig fields offered as flags: the budget and the settings that are usually fixed.
CONFIG_FLAGS = (
    "steps",
    "seqlen",
    "batch_size",
    "grad_accum",
    "eval_interval",
    "val_blocks",
    "data",
    "seed",
    "interval",
    "projection",
    "optimizer",
    "lr_schedule",
    "warmup_steps",
    "max_grad_norm",
    "checkpoint_interval",
    "log_interval",
    "pattern",
    "bf16",
)


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``elsa tune`` (called by :func:`cli.main.make_parser`)."""
    what = parser.add_argument_group("what to search")
    what.add_argument(
        "--model", default=None, help="model alias, local directory, GGUF file or hub id (default: smollm2-135m)"
    )
    what.add_argument(
        "--sparsity", type=float, nargs="+", default=None, help="one search per sparsity, e.g. 0.7 0.8 0.9"
    )
    what.add_argument("--trials", type=int, default=8, help="trials per sparsity (the seed points first: tune/seed.py)")
    what.add_argument(
        "--space",
        default=None,
        help="YAML search space, or a bundled one by name: default (around the budget rule, decoupled penalty) "
        "or paper (coupled and decoupled, wide ranges, Table 5 seeded)",
    )
    what.add_argument("--search", choices=SEARCHERS, default="optuna", help="search algorithm")
    what.add_argument("--search-seed", type=int, default=0, help="seed of the search algorithm")
    what.add_argument(
        "--scheduler", choices=SCHEDULERS, default="asha", help="early stopping on the projected validation loss"
    )
    what.add_argument(
        "--grace-period", type=int, default=None, help="steps before ASHA may stop a trial (default: --eval-interval)"
    )
    what.add_argument(
        "--reduction-factor", type=float, default=2.0, help="ASHA keeps the best 1/r of trials at each rung"
    )
    what.add_argument(
        "--max-val-loss",
        type=float,
        default=DEFAULT_MAX_VAL_LOSS,
        help="a projected validation loss above this is divergence: the trial is stopped and marked",
    )
    what.add_argument(
        "--export", action="store_true", help="write every trial's pruned checkpoint (off: trials only measure)"
    )

    method = parser.add_argument_group("method config shared by every trial (PruneConfig fields)")
    method.add_argument("--config", default=None, help="YAML config file (flat PruneConfig fields)")
    add_config_options(method, CONFIG_FLAGS)
    _add_run_arguments(parser.add_argument_group("where and how to run"))


def _add_run_arguments(run) -> None:
    """Where the trials run (resources, cluster, storage) and where their results go."""
    run.add_argument("--max-concurrent", type=int, default=1, help="trials running at once")
    run.add_argument(
        "--trial-resources",
        default='{"CPU": 0.5}',
        help='JSON: Ray resources each trial\'s driver asks for, e.g. \'{"CPU": 1, "trainer": 1}\'',
    )
    run.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial (FSDP2 when > 1)")
    run.add_argument("--cpus-per-worker", type=float, default=0.5, help="CPUs each trial's worker asks for")
    run.add_argument("--gpu", action="store_true", help="one GPU per worker")
    run.add_argument("--address", default=None, help=ADDRESS_HELP)
    run.add_argument(
        "--resource-timeout",
        type=float,
        default=RESOURCE_TIMEOUT_S,
        metavar="SECONDS",
        help="on a joined cluster, how long to wait (asking its autoscaler) for nodes that hold one trial",
    )
    run.add_argument(
        "--storage-path", default=None, help="Tune/Train storage: a path or URI (default: $ELSA_STORAGE or ./elsa-runs)"
    )
    run.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    run.add_argument("--experiment", default=None, help="MLflow experiment (default: elsa-tune)")
    run.add_argument("--name", default=None, help="search name under --storage-path (needed to resume)")
    run.add_argument("--resume", action="store_true", help="continue the search --name (finished trials are not rerun)")
    run.add_argument("--resume-errored", action="store_true", help="with --resume: also resume trials that crashed")
    run.add_argument(
        "--trial-retries",
        type=int,
        default=TRIAL_RETRIES,
        help="times a trial that raised (e.g. its node was lost) starts again; its MLflow run counts attempts",
    )
    run.add_argument(
        "--verbose", action="store_true", help="show Ray's worker output and third-party warnings beside Tune's table"
    )
    run.add_argument(
        "--preset-out",
        default=None,
        help="preset file for the best configurations (default: <storage>/<name>/best_presets.yaml)",
    )


def _trial_resources(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--trial-resources {text!r} is not JSON ({err.msg}); e.g. '{{\"CPU\": 1}}'") from None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in value.values()):
        raise ValueError(
            f"--trial-resources {text!r} must map resource names to non-negative numbers, e.g. "
            f'\'{{"CPU": 1, "trainer": 1}}\''
        )
    return value


def request_from_args(args: argparse.Namespace):
    """The SearchRequest and Where of a parsed command line."""
    from tune.runner import DEFAULT_EXPERIMENT, SearchRequest, Where

    config = load_yaml(args.config) if args.config else {}
    config.update({name: getattr(args, name) for name in CONFIG_FLAGS if getattr(args, name, None) is not None})
    for key in ("model", "sparsity"):
        config.pop(key, None)
    file_model = load_yaml(args.config).get("model") if args.config else None
    model = args.model or file_model or PruneConfig.model_fields["model"].default
    config = absolute_local_paths(config)  # trials run in other directories
    request = SearchRequest(
        model=absolute_local_paths({"model": model})["model"],
        sparsities=list(args.sparsity or []),
        trials=args.trials,
        config=config,
        space=args.space,
        search=args.search,
        scheduler=args.scheduler,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        max_concurrent=args.max_concurrent,
        trial_resources=_trial_resources(args.trial_resources),
        workers_per_trial=args.workers_per_trial,
        cpus_per_worker=args.cpus_per_worker,
        gpu=args.gpu,
        max_val_loss=args.max_val_loss,
        search_seed=args.search_seed,
        export=args.export,
        name=args.name,
        experiment=args.experiment or DEFAULT_EXPERIMENT,
    )
    where = Where(
        storage_path=args.storage_path,
        address=args.address,
        resource_timeout=args.resource_timeout,
        tracking_uri=args.tracking_uri,
        preset_out=args.preset_out,
        resume=args.resume,
        resume_errored=args.resume_errored,
        trial_retries=args.trial_retries,
    )
    return request, where


def summary(report) -> str:
    """What the user reads at the end: every trial, the best against the seed, where things went."""
    lines = [
        f"search      {report.name} ({report.root})",
        f"mlflow      {report.tracking_uri}",
        f"wall time   {report.wall_s:.1f} s",
    ]
    for outcome in report.outcomes:
        lines.append("")
        lines.append(
            f"sparsity {outcome.sparsity:g}: parent run {outcome.parent_run_id}, {len(outcome.rows)} trials"
            + (" (interrupted)" if outcome.interrupted else "")
        )
        lines.append(f"  {'trial':<13}{'outcome':<22}{'step':>6}  {'val_loss_proj':>13}  config")
        for row in outcome.rows:
            value = "-" if row.val_loss_projected is None else f"{row.val_loss_projected:.5g}"
            config = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.sample.items())
            lines.append(
                f"  {row.trial_id:<13}{row.outcome + (f' ({row.seed})' if row.seed else ''):<22}{row.step:>6}  "
                f"{value:>13}  {config}"
            )
        for seed in outcome.seeds:
            lines.append(
                f"  seed {outcome.seed_sources.get(seed.seed, seed.seed)}: {seed.outcome}, val_loss_projected "
                f"{seed.val_loss_projected}"
            )
        if outcome.best is not None:
            lines.append(
                f"  best: trial {outcome.best.trial_id} (run {outcome.best.mlflow_run_id}), val_loss_projected "
                f"{outcome.best.val_loss_projected:.5g}"
            )
        else:
            lines.append("  best: none (no trial completed its budget)")
    if report.preset_file:
        lines.append("")
        lines.append(
            f"preset file {report.preset_file}  (use: elsa prune --preset {report.preset_file} --model ... "
            "--sparsity ...)"
        )
    return "\n".join(lines)


def run_tune(args: argparse.Namespace) -> int:
    """Entry point of ``elsa tune``; exit 0: a preset was written, 130: interrupted (resumable)."""
    from tune.runner import run_search

    request, where = request_from_args(args)
    if not where.resume and not request.sparsities:
        raise ValueError("--sparsity is required, e.g. --sparsity 0.7 0.8 (or --resume --name N to continue a search)")
    report = run_search(request, where)
    print(summary(report))
    if report.interrupted:
        return 130
    return 0 if report.preset_file else 1


def add_command(commands) -> None:
    """The ``tune`` subcommand, added to ``elsa``'s subparsers."""
    parser = commands.add_parser("tune", help="Ray Tune search over lr, lambda and schedules")
    add_tune_arguments(parser)
    parser.set_defaults(handler=run_tune)
