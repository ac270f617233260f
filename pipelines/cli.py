"""The pipeline's commands of ``elsa``: prune, eval, compare, sync (``cli.main`` puts them together
with ``elsa tune``; this module imports nothing from :mod:`tune`).

Every field of :class:`elsa.config.PruneConfig` is an option of ``elsa prune`` (``--lmda-final``
sets ``lmda_final``), generated from the config itself so none can be forgotten. Precedence:
defaults < ``--config FILE`` < ``--preset`` < explicit flags. Errors print one line and exit
non-zero; exit 0 means the checkpoint was written and its sparsity verified.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import typing

from elsa.config import ConfigError, EvalSettings, PruneConfig, make_config
from elsa.config_files import load_yaml
from pipelines.records.tracking import DEFAULT_EXPERIMENT
from pipelines.run.capacity import RESOURCE_TIMEOUT_S
from pipelines.run.preflight import absolute_local_paths

# help of the options several commands share (elsa prune / eval / tune), written once
ADDRESS_HELP = "Ray cluster to join (default: RAY_ADDRESS, else local)"
TRACKING_URI_HELP = "MLflow URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)"

# options of the run rather than of the method (see pipelines.run.job.RunOptions)
_RUN_OPTIONS = (
    "output",
    "workers",
    "gpu",
    "address",
    "storage_path",
    "tracking_uri",
    "experiment",
    "run_name",
    "no_eval",
    "max_failures",
    "cpus_per_worker",
    "resource_timeout",
    "overwrite",
    "keep_checkpoints",
    "register",
)


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


def _field_help(info, default) -> str:
    """A field's description and its default: the one text of its option, stated in elsa/config.py."""
    return f"{info.description} (default: {default!r})".replace("%", "%%")  # argparse formats help with %


def add_config_options(group, names=None) -> None:
    """One option per PruneConfig field (or the fields in ``names``), typed from its annotation;
    default None (= unset). The one generator of method flags, for ``elsa prune`` and ``elsa tune``."""
    own = [name for name in PruneConfig.model_fields if name not in EvalSettings.model_fields]
    for name in names or [*own, *EvalSettings.model_fields]:
        if name == "method_args":
            _add_method_options(group)
            continue
        info = PruneConfig.model_fields[name]
        kind = _strip_optional(info.annotation)
        default = info.default_factory() if info.default_factory is not None else info.default
        help_text = _field_help(info, default)
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


def _add_method_options(group) -> None:
    """``--<method>-<setting>`` for every one-shot method's typed settings (``--sparsegpt-damp``)."""
    from elsa.methods.settings import SETTINGS

    for method, model in SETTINGS.items():
        for field, info in model.model_fields.items():
            flag, help_text = f"--{method}-{field.replace('_', '-')}", f"{method}: " + _field_help(info, info.default)
            if info.annotation is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            else:
                group.add_argument(flag, type=info.annotation, default=None, help=help_text)


def _method_args(args: argparse.Namespace) -> dict:
    """The ``--<method>-<setting>`` flags given, as a ``method_args`` layer."""
    from elsa.methods.settings import SETTINGS

    out: dict = {}
    for method, model in SETTINGS.items():
        for field in model.model_fields:
            value = getattr(args, f"{method}_{field}", None)
            if value is not None:
                out.setdefault(method, {})[field] = value
    return out


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where and how to run")
    group.add_argument("--config", help="YAML config file (flat PruneConfig fields)")
    group.add_argument(
        "--resume",
        default=None,
        metavar="RUN_ID",
        help="continue this MLflow run after its driver died (its own config, storage and newest checkpoint)",
    )
    group.add_argument(
        "--output",
        default=None,
        help="also copy the exported model into this local directory (the "
        "durable copy is the MLflow run's 'checkpoint' artifact)",
    )
    group.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep the run's storage folder (Ray Train's "
        "checkpoints and the export); by default it is removed once the export is logged and evaluated",
    )
    group.add_argument(
        "--register",
        default=None,
        metavar="NAME",
        help="add the export as a new version of this MLflow registered model (tags: sparsity, ppl)",
    )
    group.add_argument("--verbose", action="store_true", help="show third-party warnings and Ray's internal log lines")
    group.add_argument("--workers", type=int, default=1, help="Ray Train workers (FSDP2 when > 1)")
    group.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL, bf16 compute)")
    group.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="CPUs (and threads) each Ray Train worker asks for; default: the machine's cores shared among the "
        "workers when Ray starts locally, 1 on a joined cluster",
    )
    group.add_argument("--address", default=None, help=ADDRESS_HELP)
    group.add_argument(
        "--resource-timeout",
        type=float,
        default=RESOURCE_TIMEOUT_S,
        metavar="SECONDS",
        help="on a joined cluster, how long to wait (asking its autoscaler) for nodes that hold the workers",
    )
    group.add_argument(
        "--storage-path", default=None, help="Ray Train storage: a path or URI (default: $ELSA_STORAGE or ./elsa-runs)"
    )
    group.add_argument(
        "--max-failures", type=int, default=0, help="worker-group restarts, each resuming from the last checkpoint"
    )
    group.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    group.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment")
    group.add_argument("--run-name", default=None, help="MLflow run name (default: MLflow's generated one)")
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
    given = _method_args(args)
    if given:  # merged into the file's block, method by method
        merged = {name: dict(values) for name, values in (file_layer.get("method_args") or {}).items()}
        for name, values in given.items():
            merged.setdefault(name, {}).update(values)
        flags["method_args"] = merged
    if "betas" in flags:
        flags["betas"] = tuple(flags["betas"])
    preset = flags.get("preset") or file_layer.get("preset")
    preset_layer = {}
    if preset:
        from elsa.presets import PresetError, preset_overrides

        model = flags.get("model") or file_layer.get("model") or PruneConfig.model_fields["model"].default
        sparsity = flags.get("sparsity", file_layer.get("sparsity"))
        try:
            preset_layer = preset_overrides(preset, model, sparsity)
        except PresetError as err:
            raise ConfigError(str(err)) from None
        flags["preset"] = preset_layer.pop("preset", preset)
    # relative paths are the user's: Ray's workers and tasks run in other directories
    return make_config(*(absolute_local_paths(layer) for layer in (file_layer, preset_layer, flags)))


def _cmd_prune(args: argparse.Namespace) -> int:
    from pipelines.run.job import RunOptions, resume_prune, run_prune
    from pipelines.run.progress import QuietWatchdog
    from pipelines.run.summary import summary_table

    options = RunOptions(**{name: getattr(args, name) for name in _RUN_OPTIONS}, command=args.command_line)
    with QuietWatchdog() if options.progress else contextlib.nullcontext():
        if args.resume:
            _check_resume_flags(args)
            result = resume_prune(args.resume, options)
        else:
            config = build_config(args)
            if config.preset:  # which entry the preset gave, or that none fit and the rule runs
                print(f"preset {config.preset}", flush=True)
            result = run_prune(config, options)
    print(summary_table(result))
    return 0


def _check_resume_flags(args: argparse.Namespace) -> None:
    """``--resume`` continues a run with the config it started with: method flags would be ignored."""
    from pipelines.run.preflight import UsageError

    given = [name for name in PruneConfig.model_fields if getattr(args, name, None) is not None]
    given += ["config"] * bool(args.config) + ["state_dtypes"] * bool(args.state_dtypes) + list(_method_args(args))
    moved = [name for name in ("run_name", "storage_path") if getattr(args, name) is not None]
    moved += ["experiment"] * (args.experiment != DEFAULT_EXPERIMENT)
    if given or moved:
        flags = ", ".join(_option(name) for name in given + moved)
        raise UsageError(f"--resume continues the run with its own config, name and storage: drop {flags}")


def _cmd_eval(args: argparse.Namespace) -> int:
    from pipelines.evals.reevaluate import reevaluate

    print(reevaluate(args))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from pipelines.records.compare import main as compare_main

    compare_main(args.experiment, args.tracking_uri, args.out)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    """Print the export's greedy completion of --prompt (pipelines.evals.speed)."""
    from pipelines.evals.speed import generate_command

    print(generate_command(args))
    return 0


def _cmd_sync(args: argparse.Namespace) -> int:
    """Upload MLflow records that runs journaled while the tracking server was away."""
    from pipelines.records.outbox import pending_count, queue_root, runs_in, sync
    from pipelines.run.storage import run_storage

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


def add_commands(commands) -> None:
    """The ``prune``, ``eval``, ``compare`` and ``sync`` subcommands, added to ``elsa``'s subparsers."""
    prune = commands.add_parser("prune", help="run one pruning job", formatter_class=_DefaultsHelp)
    method = prune.add_argument_group("method config (any field of PruneConfig)")
    add_config_options(method)
    method.add_argument("--state-dtypes", default=None, help="ELSA-L shorthand, e.g. 'u=bf16,z=fp8_e4m3,z_sparse'")
    _add_run_options(prune)
    prune.set_defaults(handler=_cmd_prune)

    evaluate = commands.add_parser("eval", help="re-evaluate a checkpoint directory or an MLflow run")
    evaluate.add_argument("--run", required=True, help="checkpoint directory or MLflow run id")
    add_config_options(
        evaluate.add_argument_group("evaluation (default: as elsa prune evaluates)"), EvalSettings.model_fields
    )
    evaluate.add_argument("--gpu", action="store_true", help="evaluate on a GPU")
    evaluate.add_argument("--address", default=None, help=ADDRESS_HELP)
    evaluate.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP + "; where --run's id is looked up")
    evaluate.add_argument("--verbose", action="store_true", help="show third-party warnings and Ray's worker output")
    evaluate.set_defaults(handler=_cmd_eval)

    compare = commands.add_parser("compare", help="table and plots of an MLflow experiment's runs")
    compare.add_argument(
        "--experiment", default=DEFAULT_EXPERIMENT, help=f"MLflow experiment (default: {DEFAULT_EXPERIMENT})"
    )
    compare.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    compare.add_argument(
        "--out", default="outputs/compare", help="folder of the table and plots (default: outputs/compare)"
    )
    compare.set_defaults(handler=_cmd_compare)

    sync_cmd = commands.add_parser("sync", help="upload MLflow records queued on disk while the server was away")
    sync_cmd.add_argument("--queue-dir", default=None, help="journal folder (default: <storage>/mlflow-queue)")
    sync_cmd.add_argument("--run", default=None, help="one MLflow run id (default: every run in the folder)")
    sync_cmd.add_argument(
        "--tracking-uri", default=None, help="MLflow URI (default: MLFLOW_TRACKING_URI, else the run's)"
    )
    sync_cmd.set_defaults(handler=_cmd_sync)

    generate = commands.add_parser("generate", help="print a greedy completion by an export (sparse if compressed)")
    generate.add_argument("--run", "--checkpoint", dest="run", required=True, help="checkpoint folder or MLflow run id")
    generate.add_argument("--prompt", required=True, help="the text the model continues")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated, at most (default: 64)")
    generate.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP + "; where --run's id is looked up")
    generate.set_defaults(handler=_cmd_generate)
