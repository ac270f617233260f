"""The ``elsa`` command line: prune, tune, eval, compare.

Every field of :class:`elsa.config.PruneConfig` is an option of ``elsa prune`` (``--lmda-final``
sets ``lmda_final``), generated from the config itself so none can be forgotten. Precedence:
defaults < ``--config FILE`` < ``--preset`` < explicit flags. Errors print one line and exit
non-zero; exit 0 means the checkpoint was written and its sparsity verified.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import typing

from elsa.config import ConfigError, PruneConfig, load_yaml, make_config

# options of the run rather than of the method (see pipelines.job.RunOptions)
_RUN_OPTIONS = ("output", "workers", "gpu", "address", "storage_path", "tracking_uri", "experiment", "run_name", "no_eval",
                "max_failures", "cpus_per_worker", "overwrite", "keep_checkpoints", "register")


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Show argparse defaults, except None: method options show the config's default themselves."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _strip_optional(annotation):
    """``X | None`` -> ``X``; anything else unchanged."""
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per PruneConfig field, typed from its annotation; default None (= unset)."""
    group = parser.add_argument_group("method config (any field of PruneConfig)")
    for name, info in PruneConfig.model_fields.items():
        kind = _strip_optional(info.annotation)
        default = info.default_factory() if info.default_factory is not None else info.default
        help_text = f"(default: {default!r})"
        if kind is bool:
            group.add_argument(_option(name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is typing.Literal:
            group.add_argument(_option(name), choices=list(typing.get_args(kind)), default=None, help=help_text)
        elif typing.get_origin(kind) is list:
            group.add_argument(_option(name), nargs="*", default=None, help=help_text)
        elif typing.get_origin(kind) is tuple:
            group.add_argument(_option(name), nargs=2, type=float, default=None, help=help_text)
        elif kind in (int, float, str):
            group.add_argument(_option(name), type=kind, default=None, help=help_text)
        else:
            group.add_argument(_option(name), default=None, help=help_text)
    group.add_argument("--state-dtypes", default=None, help="ELSA-L shorthand, e.g. 'u=bf16,z=fp8_e4m3,z_sparse'")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where and how to run")
    group.add_argument("--config", help="YAML config file (flat PruneConfig fields)")
    group.add_argument("--output", default=None, help="also copy the exported model into this local directory (the "
                       "durable copy is the MLflow run's 'checkpoint' artifact)")
    group.add_argument("--keep-checkpoints", action="store_true", help="keep the run's storage folder (Ray Train's "
                       "checkpoints and the export); by default it is removed once the export is logged and evaluated")
    group.add_argument("--register", default=None, metavar="NAME", help="add the export as a new version of this "
                       "MLflow registered model (tags: sparsity, ppl)")
    group.add_argument("--verbose", action="store_true", help="show third-party warnings and Ray's internal log lines")
    group.add_argument("--workers", type=int, default=1, help="Ray Train workers (FSDP2 when > 1)")
    group.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL, bf16 compute)")
    group.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs (and threads) each Ray Train worker asks for; default: the machine's cores shared among the workers when Ray starts locally, 1 on a joined cluster")
    group.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    group.add_argument("--storage-path", default=None, help="Ray Train storage: a path or s3://, gs:// URI")
    group.add_argument("--max-failures", type=int, default=0, help="worker-group restarts, each resuming from the last checkpoint")
    group.add_argument("--tracking-uri", default=None, help="MLflow URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    group.add_argument("--experiment", default="elsa", help="MLflow experiment")
    group.add_argument("--run-name", default=None)
    group.add_argument("--no-eval", action="store_true", help="skip the downstream evaluation")
    group.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --output")


def _state_dtypes(text: str | None) -> dict:
    """'u=bf16,z=fp8_e4m3,z_sparse' -> {u_dtype: bf16, z_dtype: fp8_e4m3, z_sparse: True}."""
    if not text:
        return {}
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part == "z_sparse":
            out["z_sparse"] = True
            continue
        key, _, value = part.partition("=")
        if key not in ("u", "z") or not value:
            raise ConfigError(f"--state-dtypes part {part!r}: use u=DTYPE, z=DTYPE or z_sparse")
        out[f"{key}_dtype"] = value
    return out


def build_config(args: argparse.Namespace) -> PruneConfig:
    """defaults < --config < --preset < flags, validated once."""
    file_layer = load_yaml(args.config) if args.config else {}
    flags = {name: getattr(args, name) for name in PruneConfig.model_fields if getattr(args, name, None) is not None}
    flags.update(_state_dtypes(args.state_dtypes))
    if "betas" in flags:
        flags["betas"] = tuple(flags["betas"])
    preset = flags.get("preset") or file_layer.get("preset")
    preset_layer = {}
    if preset:
        from tune.presets import PresetError, preset_overrides

        model = flags.get("model") or file_layer.get("model") or PruneConfig.model_fields["model"].default
        sparsity = flags.get("sparsity", file_layer.get("sparsity"))
        try:
            preset_layer = preset_overrides(preset, model, sparsity)
        except PresetError as err:
            raise ConfigError(str(err)) from None
        flags["preset"] = preset_layer.pop("preset", preset)
    return make_config(file_layer, preset_layer, flags)


def _command_line() -> str:
    """The command as typed (for the model card)."""
    import shlex

    return "elsa " + shlex.join(_ARGV)


_ARGV: list[str] = []  # the arguments main() parsed


def _cmd_prune(args: argparse.Namespace) -> int:
    from pipelines.job import RunOptions, run_prune, summary_table

    cfg = build_config(args)
    options = RunOptions(**{name: getattr(args, name) for name in _RUN_OPTIONS}, command=_command_line())
    result = run_prune(cfg, options)
    print(summary_table(result))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pipelines.reevaluate import reevaluate

    print(reevaluate(args))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from pipelines.compare import main as compare_main

    compare_main(args.experiment, args.tracking_uri, args.out)
    return 0


def _cmd_sync(args: argparse.Namespace) -> int:
    """Upload MLflow records that runs journaled while the tracking server was away."""
    from pipelines.outbox import pending_count, queue_root, runs_in, sync
    from pipelines.storage import run_storage

    root = args.queue_dir or str(queue_root(run_storage(None)))
    runs = [args.run] if args.run else runs_in(root)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    total = 0
    for run_id in runs:
        sent = sync(root, run_id, uri)
        total += sum(sent.values())
        print(f"run {run_id}: {sum(sent.values())} records sent, {pending_count(root, run_id)} pending")
    print(f"{total} records sent from {root}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from tune.cli import run_tune

    return run_tune(args)


# argparse reads "-1e-3" or "-inf" after an option as another option ("expected one argument"),
# so the value never reaches the validator that would say what is wrong with it.
_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser for which every negative number, exponents included, is a value."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NUMBER


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="elsa", description="Prune LLMs to extreme sparsity with ELSA (surrogate-free ADMM) on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    prune = commands.add_parser("prune", help="run one pruning job", formatter_class=_DefaultsHelp)
    _add_config_options(prune)
    _add_run_options(prune)
    prune.set_defaults(handler=_cmd_prune)

    evaluate = commands.add_parser("eval", help="re-evaluate a checkpoint directory or an MLflow run")
    evaluate.add_argument("--run", required=True, help="checkpoint directory or MLflow run id")
    evaluate.add_argument("--eval-datasets", nargs="*", default=["wikitext2-bundled"])
    evaluate.add_argument("--eval-seqlen", type=int, default=256)
    evaluate.add_argument("--eval-max-windows", type=int, default=32)
    evaluate.add_argument("--lm-eval-tasks", nargs="*", default=[])
    evaluate.add_argument("--lm-eval-limit", type=int, default=None)
    evaluate.add_argument("--lm-eval-include", default=None, help="directory of extra lm-eval task YAMLs")
    evaluate.add_argument("--gpu", action="store_true")
    evaluate.add_argument("--address", default=None)
    evaluate.add_argument("--tracking-uri", default=None)
    evaluate.add_argument("--verbose", action="store_true", help="show third-party warnings and Ray's worker output")
    evaluate.set_defaults(handler=_cmd_eval)

    compare = commands.add_parser("compare", help="table and plots of an MLflow experiment's runs")
    compare.add_argument("--experiment", default="elsa")
    compare.add_argument("--tracking-uri", default=None)
    compare.add_argument("--out", default="outputs/compare")
    compare.set_defaults(handler=_cmd_compare)

    sync_cmd = commands.add_parser("sync", help="upload MLflow records queued on disk while the server was away")
    sync_cmd.add_argument("--queue-dir", default=None, help="journal folder (default: <storage>/mlflow-queue)")
    sync_cmd.add_argument("--run", default=None, help="one MLflow run id (default: every run in the folder)")
    sync_cmd.add_argument("--tracking-uri", default=None,
                          help="MLflow URI (default: MLFLOW_TRACKING_URI, else the run's)")
    sync_cmd.set_defaults(handler=_cmd_sync)

    tune = commands.add_parser("tune", help="Ray Tune search over lr, lambda and schedules")
    try:
        from tune.cli import add_tune_arguments

        add_tune_arguments(tune)
    except ImportError:  # pragma: no cover - tune ships with the package
        pass
    tune.set_defaults(handler=_cmd_tune)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a runtime failure, 2 a usage error (argparse's code for bad arguments)."""
    from pipelines.errors import one_line

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _ARGV[:] = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    if args.command in ("prune", "eval"):
        from pipelines.quiet import configure

        configure(verbose=args.verbose)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("elsa: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user; the traceback is in the logs / MLflow tag
        if os.environ.get("ELSA_DEBUG"):
            raise
        print(f"elsa: error: {one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
