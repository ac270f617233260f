"""The search space: which PruneConfig fields a search varies, over which ranges, read from YAML.

Why a module of its own: the same few lines of YAML must become three different things — Ray Tune
sample domains for the searcher, the PruneConfig overrides of one trial, and the check that the
seed points fit (tune/seed.py) — and they must agree. The one non-obvious mapping is the penalty schedule: a
sample holds the value a schedule *ends* at (``lmda``, ``rho``), and :meth:`SearchSpace.overrides`
turns it into the start/final pair PruneConfig needs (see ``tune/spaces/default.yaml``):

* ``constant``: the value for the whole run;
* ``linear`` / ``cosine``: lambda rises from 0 (the paper's cosine schedule does);
* ``exponential`` (and every rho schedule, since rho must stay > 0): from ``value * start_fraction``.

Defining the searched lambda as the final value keeps one meaning across schedules: it is the
number Table 5 reports, so the paper's setting is a point of the space whatever its schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from elsa.config import PruneConfig

DEFAULT_SPACE = "default.yaml"
KINDS = ("loguniform", "uniform", "choice")
# Fields that define what a trial is measured on: they must be equal across trials, so they come
# from the command line or --config, never from the space.
BUDGET_FIELDS = (
    "model",
    "method",
    "sparsity",
    "pattern",
    "sparsity_map",
    "steps",
    "seqlen",
    "batch_size",
    "grad_accum",
    "data",
    "val_blocks",
    "eval_interval",
    "seed",
)
# Fields the schedule mapping writes; a space sets them through lmda / rho / *_schedule.
DERIVED_FIELDS = ("lmda_final", "rho_final")
OPTIONS = {"start_fraction": 0.01}


class SpaceError(ValueError):
    """The search-space file is invalid; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Dimension:
    """One searched field: ``kind`` in KINDS, ``args`` (low, high) or the choices."""

    name: str
    kind: str
    args: tuple

    def domain(self):
        """The Ray Tune sample domain."""
        from ray import tune as ray_tune

        if self.kind == "loguniform":
            return ray_tune.loguniform(*self.args)
        if self.kind == "uniform":
            return ray_tune.uniform(*self.args)
        return ray_tune.choice(list(self.args))

    def neutral(self) -> Any:
        """A harmless value for a seed point that does not set this field (it is irrelevant there)."""
        if self.kind == "loguniform":
            return math.sqrt(self.args[0] * self.args[1])
        if self.kind == "uniform":
            return (self.args[0] + self.args[1]) / 2
        return self.args[0]

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.args
        return self.args[0] <= float(value) <= self.args[1]

    def describe(self) -> str:
        if self.kind == "choice":
            return "choice(" + ", ".join(str(v) for v in self.args) + ")"
        return f"{self.kind}({self.args[0]:g}, {self.args[1]:g})"


@dataclass(frozen=True)
class SearchSpace:
    """The dimensions searched, the fields fixed for every trial, and the mapping options."""

    dimensions: dict[str, Dimension]
    fixed: dict[str, Any] = field(default_factory=dict)
    start_fraction: float = OPTIONS["start_fraction"]
    source: str = DEFAULT_SPACE

    def param_space(self) -> dict:
        """Ray Tune's ``param_space``: one sample domain per searched field."""
        return {name: dim.domain() for name, dim in self.dimensions.items()}

    def describe(self) -> dict[str, str]:
        """Flat text form, for MLflow parameters and the summary."""
        out = {name: dim.describe() for name, dim in self.dimensions.items()}
        out.update({name: f"fixed({value})" for name, value in self.fixed.items()})
        out["start_fraction"] = f"{self.start_fraction:g}"
        return out

    def overrides(self, sample: dict, base: dict) -> dict:
        """PruneConfig overrides of one trial: ``sample`` (searched values) on top of ``base``.

        Keys set to None in the result must replace the base's value (e.g. a constant schedule
        clears ``lmda_final``); :func:`trial_config` applies them that way.
        """
        values = {**self.fixed, **sample}
        out = {k: v for k, v in values.items() if k not in ("lmda", "lmda_schedule", "rho", "rho_schedule")}
        if "lmda" in values or "lmda_schedule" in values:
            kind = values.get("lmda_schedule", base.get("lmda_schedule", "constant"))
            target = values.get("lmda", schedule_target(base, "lmda"))
            out.update(_schedule("lmda", kind, float(target), self.start_fraction, zero_start=True))
        penalty = values.get("penalty", base.get("penalty", "coupled"))
        if "rho" in values or "rho_schedule" in values:
            if penalty == "decoupled":
                kind = values.get("rho_schedule", base.get("rho_schedule", "constant"))
                target = values.get("rho", schedule_target(base, "rho"))
                if target is None:  # no rho anywhere: keep the derived rho = lr*lmda/(1+lr*lmda)
                    out.update(rho=None, rho_final=None, rho_schedule="constant")
                else:
                    out.update(_schedule("rho", kind, float(target), self.start_fraction, zero_start=False))
            else:  # coupled: rho means nothing; keep the config free of it
                out.update(rho=None, rho_final=None, rho_schedule="constant")
        return out


def schedule_target(base: dict, prefix: str):
    """The value a base config's schedule ends at (the space's meaning of lmda / rho)."""
    if base.get(f"{prefix}_schedule", "constant") != "constant" and base.get(f"{prefix}_final") is not None:
        return base[f"{prefix}_final"]
    return base.get(prefix)


def _schedule(prefix: str, kind: str, target: float, start_fraction: float, zero_start: bool) -> dict:
    """Start/final pair for a schedule that ends at ``target`` (see the module docstring)."""
    if kind == "constant":
        return {prefix: target, f"{prefix}_final": None, f"{prefix}_schedule": "constant"}
    start = 0.0 if zero_start and kind in ("linear", "cosine") else target * start_fraction
    return {prefix: start, f"{prefix}_final": target, f"{prefix}_schedule": kind}


def trial_config(base: dict, overrides: dict) -> PruneConfig:
    """The validated PruneConfig of one trial (None in ``overrides`` resets a field to its default)."""
    from elsa.config import make_config

    kept = {k: v for k, v in base.items() if k not in overrides}
    merged = {**kept, **{k: v for k, v in overrides.items() if v is not None}}
    return make_config(merged)


def default_space_path() -> Path:
    return Path(str(resources.files("tune").joinpath("spaces", DEFAULT_SPACE)))


def bundled_spaces() -> list[str]:
    """Names of the spaces shipped in ``tune/spaces`` (``--space NAME``)."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("tune").joinpath("spaces").iterdir())


def load_space(path: str | Path | None = None) -> SearchSpace:
    """Read and validate a space file, or a bundled space by name (default: ``tune/spaces/default.yaml``)."""
    path = Path(path) if path else default_space_path()
    if not path.is_file() and str(path) in bundled_spaces():
        path = Path(str(resources.files("tune").joinpath("spaces", f"{path}.yaml")))
    if not path.is_file():
        raise SpaceError(
            f"search space {str(path)!r} is neither a file nor a bundled space ({', '.join(bundled_spaces())}); "
            "see tune/spaces/default.yaml for the format"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SpaceError(f"search space {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"search space {str(path)!r} must be a mapping of field: dimension")
    return parse_space(data, str(path))


def parse_space(data: dict, source: str = "<space>") -> SearchSpace:
    """Validate a space given as a dictionary (the YAML's content)."""
    options = dict(OPTIONS)
    unknown_options = set(data.get("options") or {}) - set(OPTIONS)
    if unknown_options:
        raise SpaceError(f"{source}: unknown options {sorted(unknown_options)}; known: {sorted(OPTIONS)}")
    options.update(data.get("options") or {})
    fraction = float(options["start_fraction"])
    if not 0.0 < fraction < 1.0:
        raise SpaceError(f"{source}: options.start_fraction={fraction} must be strictly between 0 and 1")
    dimensions: dict[str, Dimension] = {}
    fixed: dict[str, Any] = {}
    for name, spec in data.items():
        if name == "options":
            continue
        if name not in PruneConfig.model_fields:
            raise SpaceError(
                f"{source}: {name!r} is not a PruneConfig field (e.g. lr, lmda, lmda_schedule, penalty, rho, "
                "rho_schedule, interval)"
            )
        if name in BUDGET_FIELDS:
            raise SpaceError(
                f"{source}: {name!r} is part of the budget every trial shares; set it with "
                f"--{name.replace('_', '-')} or --config, not in the space"
            )
        if name in DERIVED_FIELDS:
            prefix = name.removesuffix("_final")
            raise SpaceError(
                f"{source}: {name!r} is derived from {prefix!r} and {prefix}_schedule ({prefix} is the value the "
                f"schedule ends at); search {prefix!r} instead"
            )
        if isinstance(spec, dict):
            dimensions[name] = _dimension(name, spec, source)
        else:
            fixed[name] = spec
    if not dimensions:
        raise SpaceError(
            f"{source}: no field is searched; give at least one dimension, e.g. lr: {{loguniform: [1.0e-5, 1.0e-2]}}"
        )
    rho = dimensions.get("rho")
    if rho is not None and rho.kind != "choice" and not (0.0 < rho.args[0] and rho.args[1] < 1.0):
        raise SpaceError(f"{source}: rho range {list(rho.args)} must lie strictly inside (0, 1)")
    return SearchSpace(dimensions, fixed, fraction, source)


def _dimension(name: str, spec: dict, source: str) -> Dimension:
    if len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise SpaceError(
            f"{source}: {name}: write exactly one of {', '.join(f'{k}: [...]' for k in KINDS)}, got {spec!r}"
        )
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise SpaceError(f"{source}: {name}.{kind} needs a non-empty list, got {args!r}")
    if kind == "choice":
        return Dimension(name, kind, tuple(args))
    if len(args) != 2:
        raise SpaceError(f"{source}: {name}.{kind} needs [low, high], got {args!r}")
    try:
        low, high = float(args[0]), float(args[1])
    except (TypeError, ValueError):
        raise SpaceError(f"{source}: {name}.{kind} bounds must be numbers, got {args!r}") from None
    if not low < high:
        raise SpaceError(f"{source}: {name}.{kind} needs low < high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{source}: {name}.loguniform needs low > 0, got {args!r}")
    return Dimension(name, kind, (low, high))
