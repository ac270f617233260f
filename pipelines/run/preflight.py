"""Checks of a run's inputs on the driver, before Ray starts and before anything is written.

Why: every mistake found here costs the user seconds; found inside a Ray worker, the same mistake
costs minutes and arrives as a wall of tracebacks, or (an output path that cannot be written) is
found only after the training, losing it. Each check raises with one line that starts with the
option at fault and says the fix. :class:`UsageError` (exit code 2) is a wrong argument;
:class:`PreflightError` (exit code 1) a valid argument the environment cannot serve now (an
uncached hub model offline, an unreachable server).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path

from elsa.config import ConfigError, PruneConfig
from pipelines.run.capacity import timeout_problem


class UsageError(ConfigError):
    """A command-line value is wrong; the message names the option and the fix (exit code 2)."""


class PreflightError(RuntimeError):
    """The input is valid but cannot be served here now (exit code 1)."""


def check_run_options(cfg: PruneConfig, options) -> None:
    """Numbers of the run itself (not of the method)."""
    if options.workers < 1:
        raise UsageError(f"--workers {options.workers} must be >= 1")
    if options.max_failures < 0:
        raise UsageError(f"--max-failures {options.max_failures} must be >= 0 (0: no restarts)")
    per_worker = options.cpus_per_worker
    if per_worker is not None and not (math.isfinite(per_worker) and per_worker > 0):
        raise UsageError(f"--cpus-per-worker {per_worker} must be a number > 0")
    if problem := timeout_problem(options.resource_timeout):
        raise UsageError(problem)
    if cfg.batch_size % options.workers:
        raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of --workers {options.workers}")


_PATH_FIELDS = ("model", "data", "sparsity_map", "lm_eval_include")
_PATH_LIST_FIELDS = ("val_data", "eval_datasets")


def _absolute(value):
    """A relative path that exists here, made absolute; anything else (a known source or alias
    name, which the loaders look up first, a hub id, a dict) unchanged."""
    from elsa.model_io.models import alias_names
    from elsa.text.data import SOURCES

    if not isinstance(value, str) or value in SOURCES or value.lower() in alias_names():
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if not path.is_absolute() and path.exists() else value


def absolute_local_paths(fields: dict) -> dict:
    """The config fields that name local files, as absolute paths: Ray's workers and tasks run in
    other directories (and on other nodes), where a path relative to the user's one means nothing."""
    fixed = {name: _absolute(fields[name]) for name in _PATH_FIELDS if fields.get(name) is not None}
    fixed.update({name: [_absolute(v) for v in fields[name]] for name in _PATH_LIST_FIELDS if fields.get(name)})
    return {**fields, **fixed}


def model_location(model: str) -> Path | None:
    """The source model's files on disk: its directory, or its GGUF file (None for a hub id)."""
    from elsa.model_io.models import resolve_model

    source = resolve_model(model)
    if source.kind == "hub":
        return None
    path = Path(source.path) / source.gguf_file if source.is_gguf else Path(source.path)
    return path.resolve()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(output: str, overwrite: bool, model_path: Path | None) -> Path:
    """Creatable, writable, empty unless ``overwrite``, and neither inside nor around the source model."""
    target = Path(output).expanduser().resolve()
    if model_path is not None and (_inside(target, model_path) or _inside(model_path, target)):
        raise UsageError(
            f"--output {output}: the source model is {model_path}; writing there would overwrite it. "
            "Choose a directory that neither holds nor lies inside the model"
        )
    if target.exists() and not target.is_dir():
        raise UsageError(f"--output {output} is an existing file; give a directory path")
    if target.is_dir():
        if any(target.iterdir()) and not overwrite:
            raise UsageError(f"--output {output} is not empty; choose a new directory or add --overwrite to replace it")
        _probe_writable(output, target)
        return target
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--output {output} cannot be created: {parent} is a file")
    _probe_writable(output, parent)
    return target


def _probe_writable(output: str, folder: Path) -> None:
    """Create and remove an empty folder in ``folder``: the only test that also holds for root
    (``os.access`` says yes to root on read-only mounts) and leaves nothing behind."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".elsa-write-probe-", dir=folder))
    except OSError as err:
        raise UsageError(
            f"--output {output} cannot be written: {folder}: {err.strerror}; choose another directory"
        ) from None


def check_model(cfg: PruneConfig) -> None:
    """Files readable, hub model available, and N:M / sparsity map fit the matrix shapes."""
    from elsa.model_io.gguf_cache import cached
    from elsa.model_io.model_files import ModelFileError, check_gguf, check_model_dir, meta_model
    from elsa.model_io.models import ModelNotAvailableError, _hub_kwargs, resolve_model
    from elsa.targets import find_targets, load_sparsity_map

    try:
        source = resolve_model(cfg.model)
    except ModelNotAvailableError as err:
        raise PreflightError(f"--model: {err}") from None
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(f"--model: {err}") from None
    try:
        if source.is_gguf and cached(Path(source.path) / source.gguf_file, "model") is None:
            check_gguf(Path(source.path) / source.gguf_file)  # a dequantised copy: transformers read it already
        elif source.kind == "local_dir":
            check_model_dir(Path(source.path))
        extra = _hub_kwargs(source)
    except ModelFileError as err:
        raise UsageError(str(err)) from None
    except ModelNotAvailableError as err:
        raise PreflightError(f"--model: {err}") from None
    if cfg.nm is None and not cfg.sparsity_map:
        return  # unstructured at one sparsity fits any shape: spare the config parse (seconds for a GGUF)
    try:
        skeleton = meta_model(source.path, source.gguf_file, **extra)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for "cannot read this config"
        raise UsageError(f"--model {cfg.model}: its config cannot be read ({type(err).__name__}: {err})") from None
    try:
        smap = load_sparsity_map(cfg.sparsity_map) if cfg.sparsity_map else None
        find_targets(skeleton, cfg.sparsity, cfg.nm, smap)
    except ValueError as err:
        field = "--sparsity-map" if cfg.sparsity_map and cfg.nm is None else "--pattern"
        raise UsageError(f"{field} {cfg.sparsity_map or cfg.pattern}: {err}") from None


def _load_tokenizer(model: str):
    from elsa.model_io.models import load_tokenizer

    try:
        return load_tokenizer(model)
    except Exception as err:  # noqa: BLE001 - the model passed its checks; its tokenizer did not
        raise UsageError(f"--model {model}: its tokenizer cannot be loaded ({type(err).__name__}: {err})") from None


def check_calibration(cfg: PruneConfig, tokenizer) -> None:
    """Readable UTF-8 text, and at least one block of ``seqlen`` tokens in train and validation
    (and in the validation split of every ``val_data`` source)."""
    checks = [("--data", cfg.data, "train"), ("--data", cfg.data, "validation")]
    checks += [("--val-data", source, "validation") for source in cfg.val_data]
    for flag, source, split in checks:
        _check_blocks(cfg, tokenizer, flag, source, split)


def _check_blocks(cfg: PruneConfig, tokenizer, flag: str, source: str, split: str) -> None:
    from elsa.text.data import HUB, PACKAGED, calibration_blocks
    from elsa.text.local_data import DataNotAvailableError

    try:
        calibration_blocks(tokenizer, source, 1, cfg.seqlen, cfg.seed, split=split, windows=cfg.windows)
    except UnicodeDecodeError as err:
        raise UsageError(
            f"{flag} {source}: not UTF-8 text ({err.reason} at byte {err.start} of {_data_file(source)}); "
            "give a text file (.txt, .jsonl, .parquet)"
        ) from None
    except DataNotAvailableError as err:
        kind = PreflightError if source in HUB + PACKAGED else UsageError
        raise kind(f"{flag}: {err}") from None
    except (ValueError, OSError) as err:
        message = str(err)
        if "tokens, fewer than" in message:
            message += f" (the {split} split; --seqlen {cfg.seqlen})"
        raise UsageError(f"{flag} {source}: {message}") from None


def _data_file(source: str) -> str:
    path = Path(source).expanduser()
    if path.is_file():
        return str(path)
    return f"a file under {path}"


def check_eval_datasets(cfg: PruneConfig) -> None:
    """Every ``--eval-datasets`` name is a known source or an existing path; hub ones available."""
    from elsa.model_io.models import hub_reachable
    from elsa.text.data import HUB, PACKAGED, SOURCES, default_split, load_text
    from elsa.text.local_data import DataNotAvailableError

    for name in cfg.eval_datasets:
        if name in SOURCES:
            if name in PACKAGED or (name in HUB and not hub_reachable()):
                try:
                    load_text(name, default_split(name))
                except DataNotAvailableError as err:
                    raise PreflightError(f"--eval-datasets: {err}") from None
            continue
        if not Path(name).expanduser().exists():
            raise UsageError(
                f"--eval-datasets: {name!r} is neither a known dataset ({', '.join(SOURCES)}) nor an existing path"
            )


def check_lm_eval_tasks(cfg: PruneConfig) -> None:
    """Every ``--lm-eval-tasks`` name is defined: by --lm-eval-include, offline data or lm-eval itself."""
    if not cfg.lm_eval_tasks:
        return
    from elsa.model_io.models import hub_reachable
    from pipelines.evals.zero_shot import LOCAL_TASKS, ZeroShotDataError, local_data_file, user_tasks

    found: set[str] = set()
    if cfg.lm_eval_include:
        try:
            found = set(user_tasks(cfg.lm_eval_include))
        except NotADirectoryError as err:
            raise UsageError(f"--lm-eval-include: {err}") from None
    missing = [t for t in cfg.lm_eval_tasks if t not in found]
    if not missing:
        return
    if hub_reachable():
        from lm_eval.tasks import TaskManager

        known = set(TaskManager().all_tasks)
        unknown = [t for t in missing if t not in known]
        if unknown:
            raise UsageError(f"--lm-eval-tasks: {unknown[0]!r} is not an lm-eval task name")
        return
    for task in missing:
        if task not in LOCAL_TASKS:
            raise UsageError(
                f"--lm-eval-tasks: {task!r} is unknown offline; use one of {', '.join(LOCAL_TASKS)} "
                "or define it in a directory of task YAMLs (--lm-eval-include DIR)"
            )
        try:
            local_data_file(task)
        except ZeroShotDataError as err:
            raise PreflightError(f"--lm-eval-tasks: {err}") from None


def local_cpus() -> float | None:
    """CPUs of the Ray this command will use if it starts one itself (None when joining a cluster)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return float(ray.cluster_resources().get("CPU", 0))
    try:
        from ray._private.utils import get_num_cpus

        return float(get_num_cpus())
    except Exception:  # noqa: BLE001 - a private helper: fall back to the OS's count
        return float(os.cpu_count() or 1)


def check_resources(cfg: PruneConfig, options) -> None:
    """A local Ray that cannot hold the requested workers is refused with the numbers (Ray would wait forever)."""
    ray = sys.modules.get("ray")
    joined = options.address or os.environ.get("RAY_ADDRESS")
    if joined and not (ray is not None and ray.is_initialized()):
        return  # a cluster may autoscale: Ray decides
    tasks = options.workers if cfg.method == "elsa" else 1
    if options.gpu:
        import torch

        gpus = torch.cuda.device_count()
        if ray is not None and ray.is_initialized():
            gpus = int(ray.cluster_resources().get("GPU", 0))
        if tasks > gpus:
            raise UsageError(f"--workers {tasks} with --gpu needs {tasks} GPUs; this machine has {gpus}")
    cpus = local_cpus()
    if cpus is None:
        return
    each = options.cpus_per_worker or 1.0
    if tasks * each > cpus + 1e-9:
        raise UsageError(
            f"--workers {tasks} x --cpus-per-worker {each:g} = {tasks * each:g} CPUs, but the local Ray has {cpus:g}; "
            "lower --workers or --cpus-per-worker"
        )


def preflight_checks(cfg: PruneConfig, options, tracking_uri: str | None = None) -> None:
    """All of the above, cheapest first (the tracking server before the seconds of model and text
    reading); nothing is written and Ray is not started."""
    check_run_options(cfg, options)
    if options.output:  # optional: the durable copy is the MLflow artifact
        check_output(options.output, getattr(options, "overwrite", False), _model_path_or_none(cfg.model))
    if tracking_uri:
        from pipelines.records.tracking import check_reachable

        check_reachable(tracking_uri)
    check_model(cfg)
    check_resources(cfg, options)
    check_calibration(cfg, _load_tokenizer(cfg.model))
    if not options.no_eval:
        check_eval_datasets(cfg)
        check_lm_eval_tasks(cfg)


def _model_path_or_none(model: str) -> Path | None:
    try:
        return model_location(model)
    except (ValueError, FileNotFoundError):
        return None  # check_model reports it with the fix
