"""What a search found: one row per trial, the best configuration, and the preset file entry.

Why the best is chosen among *completed* trials by their *last* projected validation loss: an
early-stopped trial's number comes from an earlier step and is not comparable, and ``elsa prune
--preset`` will run the whole budget. Diverged trials never win.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tune.search import METRIC, diverged
from tune.seed import RULE
from tune.space import SearchSpace
from tune.starts import label_fields


@dataclass
class TrialRow:
    trial_id: str
    sample: dict
    val_loss_projected: float | None
    step: int
    outcome: str  # completed | stopped_early | nonfinite_loss | exploded_loss | error | unfinished
    mlflow_run_id: str | None = None
    seed: str = ""  # the kind of seed point this trial evaluated (tune/seed.py: rule, paper); "" if sampled

    @property
    def is_seed(self) -> bool:
        return bool(self.seed)


@dataclass
class SparsityOutcome:
    """The result of one Tuner (one sparsity)."""

    sparsity: float
    parent_run_id: str
    experiment_path: str
    rows: list[TrialRow] = field(default_factory=list)
    best: TrialRow | None = None
    seeds: list[TrialRow] = field(default_factory=list)  # the seed points' trials, in evaluation order
    seed_sources: dict[str, str] = field(default_factory=dict)  # seed kind -> where it came from
    interrupted: bool = False
    wall_s: float = 0.0

    def count(self, outcome: str) -> int:
        return sum(row.outcome == outcome for row in self.rows)


def _trial_order(result) -> tuple[str, int]:
    """(trial id, creation index) from the result and its directory ``<trainable>_<id>_<index>_...``.

    Trial ids are random with most searchers; the index is the order Tune created the trials
    in, so the seed point (evaluated first) is trial 1.
    """
    name = Path(str(result.path)).name
    trial_id = str((result.metrics or {}).get("trial_id") or "")
    if not trial_id:  # a trial that failed before its first report
        match = re.match(r"^.+?_([0-9a-f]{5,}(?:_\d{5})?)_(\d+)_", name)
        trial_id = match.group(1) if match else name
    tail = name.split(f"{trial_id}_", 1)[-1]
    index = tail.split("_", 1)[0]
    return trial_id, int(index) if index.isdigit() else 10**9


def trial_rows(grid, steps: int, max_val_loss: float, seed_points: dict[str, dict]) -> list[TrialRow]:
    """One row per trial of a ``ResultGrid``, in creation order (the seeds first); ``seed_points``:
    seed kind -> point, each marking the first trial that evaluated it."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        step = int(metrics.get("step", 0) or 0)
        value = metrics.get(METRIC)
        reason = diverged(metrics, max_val_loss)
        if result.error is not None:
            outcome = "error"
        elif reason:
            outcome = reason
        elif value is None:
            outcome = "unfinished"
        elif step < steps:
            outcome = "stopped_early"
        else:
            outcome = "completed"
        sample = {k: v for k, v in (result.config or {}).items()}
        trial_id, index = _trial_order(result)
        rows.append((index, TrialRow(trial_id, sample, value, step, outcome)))
    rows = [row for _, row in sorted(rows, key=lambda pair: pair[0])]
    for kind, point in seed_points.items():
        row = next((row for row in rows if not row.seed and same_point(row.sample, point)), None)
        if row is not None:
            row.seed = kind
    return rows


def same_point(sample: dict, point: dict) -> bool:
    """Equal on every key of ``point`` (floats to 1e-9 relative: they went through JSON)."""
    for key, expected in point.items():
        got = sample.get(key)
        if isinstance(expected, float) and isinstance(got, (int, float)):
            if abs(got - expected) > 1e-9 * max(abs(expected), 1e-30):
                return False
        elif got != expected:
            return False
    return True


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    done = [row for row in rows if row.outcome == "completed" and row.val_loss_projected is not None]
    return min(done, key=lambda row: row.val_loss_projected) if done else None


def preset_entry(model: str, outcome: SparsityOutcome, space: SearchSpace, base: dict, search_name: str) -> dict:
    """The preset-file entry for the best trial (the format ``elsa prune --preset FILE`` reads)."""
    best = outcome.best
    overrides = space.overrides(best.sample, base)
    config = {k: _plain(v) for k, v in overrides.items() if v is not None and k in kept_keys(best, overrides)}
    entry = {
        "model": model,
        "sparsity": float(outcome.sparsity),
        "config": config,
        "val_loss_projected": float(best.val_loss_projected),
        "trial_id": best.trial_id,
        "mlflow_run_id": best.mlflow_run_id,
        "search": search_name,
        **({"best_seed": best.seed} if best.seed else {}),  # a rule seed's preset holds its changes only
        "budget": {k: base.get(k) for k in ("steps", "seqlen", "batch_size", "grad_accum", "data", "val_blocks")},
    }
    entry["seeds"] = [
        {
            "kind": row.seed,
            "source": outcome.seed_sources.get(row.seed, row.seed),
            "val_loss_projected": None if row.val_loss_projected is None else float(row.val_loss_projected),
            "outcome": row.outcome,
        }
        for row in outcome.seeds
    ]
    return entry


def kept_keys(best: TrialRow, overrides: dict) -> set[str]:
    """The keys a preset keeps of the best trial: all of them, but of a budget-rule seed only what
    the seed changed from the rule (``rule/allocation:uniform`` keeps ``allocation``; ``rule``
    nothing). Why: a rule seed's point is the rule *at the trial budget* (interval 2 at 64 steps);
    ``elsa prune --preset`` at another budget must get the rule's values for that budget."""
    if best.seed != RULE and not best.seed.startswith(RULE + "/"):
        return set(overrides)
    return label_fields(best.seed.removeprefix(RULE))  # the kind is RULE + variant_label (tune/seed.py)


def _plain(value):
    """YAML-friendly scalars (numpy floats and the like become Python numbers)."""
    if hasattr(value, "item"):
        return value.item()
    return value


def merge_entries(path: str | Path, entries: list[dict]) -> list[dict]:
    """Existing entries of ``path`` with those for the same (model, sparsity) replaced."""
    path = Path(path)
    old = []
    if path.is_file():
        old = (yaml.safe_load(path.read_text()) or {}).get("presets") or []
    keys = {(e["model"], float(e["sparsity"])) for e in entries}
    kept = [e for e in old if (e.get("model"), float(e.get("sparsity", -1))) not in keys]
    return kept + entries
