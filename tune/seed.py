"""The first points of every search: what ``elsa prune`` would do anyway, then the paper's Table 5.

Why: a search should never end worse than not searching. Evaluating the budget rule's own
setting first (Tune's ``points_to_evaluate``) makes the winner at least as good as the defaults
at the search's budget, and gives the searcher the baseline a user compares against. The
paper's Table 5 setting for the nearest model and sparsity follows when the space can express
it (it searches ``lmda``, the table's penalty): it is the best published prior. Only the searched
keys are taken: the user's budget is kept for every trial.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

from elsa.presets import paper_preset
from tune.space import SearchSpace

log = logging.getLogger(__name__)

RULE, PAPER = "rule", "paper"  # the kinds of seed point, in the order they are evaluated
# Searched choices whose every value is also tried with the rule's setting otherwise (besides the
# start's fields, tune/starts.py): "does distillation pay at this budget" is one such question.
RULE_ALTERNATIVES = ("loss",)


@dataclass(frozen=True)
class SeedPoint:
    """A sample to evaluate before the searcher's own: its ``kind`` (``rule`` or ``paper``) and
    where it came from (e.g. ``rule:steps=32`` or ``paper:facebook/opt-125m@0.7``)."""

    point: dict
    source: str
    notes: tuple[str, ...] = ()
    kind: str = PAPER


def count_parameters(model: str) -> float | None:
    """Parameters of a local Hugging Face directory, read from the safetensors headers only.

    Used to choose the paper's model nearest in size for a model the table does not name; reading
    the headers costs milliseconds, loading the model would cost seconds to minutes.
    """
    directory = Path(model)
    if not directory.is_dir():
        return None
    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        with file.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                total += count
    return float(total) or None


def _as_point(space: SearchSpace, values: dict, who: str) -> tuple[dict, list[str]]:
    """``values`` (field -> value, missing or None: not set) as a complete point of ``space``.

    A field ``values`` does not set gets the dimension's neutral value (irrelevant there); a value
    outside a searched range is kept (the searcher evaluates it as given) with a note; a choice
    that does not offer the value gets the neutral value instead, with a note.
    """
    point, notes = {}, []
    for name, dim in space.dimensions.items():
        value = values.get(name)
        if value is None:
            point[name] = dim.neutral()
            continue
        if dim.kind == "choice" and value not in dim.args:
            notes.append(
                f"{who} {name}={value} is not among the choices {list(dim.args)}; the seed uses {dim.neutral()}"
            )
            point[name] = dim.neutral()
            continue
        if dim.kind != "choice" and not dim.contains(value):
            notes.append(f"{who} {name}={value:g} lies outside the searched range {list(dim.args)}; evaluated as given")
        point[name] = value
    for note in notes:
        log.warning("seed: %s", note)
    return point, notes


def paper_seed(space: SearchSpace, model: str, sparsity: float) -> SeedPoint:
    """Table 5's setting as a point of ``space``.

    The space's ``lmda`` is the value the schedule ends at, which is the table's lambda for every
    schedule (cosine rises from 0 to it).
    """
    preset = paper_preset(model, sparsity, count_parameters(model))
    table = dict(preset)
    if table.get("lmda_schedule", "constant") != "constant":
        table["lmda"] = table["lmda_final"]
    point, notes = _as_point(space, table, "the paper's")
    return SeedPoint(point, preset["preset"], tuple(notes), PAPER)


def rule_seed(space: SearchSpace, base: dict, median_rms: float | None) -> SeedPoint | None:
    """The budget rule's setting (``base``, the trials' shared config with the rule filled in) as a
    point of ``space``; None when the rule's lr is searched but cannot be resolved here.

    The rule leaves lr unset and scales it to the dense model's weights (elsa/weight_scale.py):
    ``median_rms`` is that model's median weight RMS, saved beside the shared start.
    """
    from elsa.budget import scaled_lr
    from tune.results import same_point
    from tune.space import schedule_target

    values = {name: base.get(name) for name in space.dimensions}
    for prefix in ("lmda", "rho"):
        if prefix in values:
            values[prefix] = schedule_target(base, prefix)
    if "lr" in space.dimensions and base.get("lr") is None:
        if median_rms is None:
            log.warning("seed: no shared start holds the dense model's weight scale; the rule's lr is not seeded")
            return None
        values["lr"] = scaled_lr(median_rms)
    point, notes = _as_point(space, values, "the rule's")
    rule = {**base, "lr": values.get("lr", base.get("lr"))}
    for name, value in space.overrides(point, base).items():  # e.g. a start_fraction unlike the rule's
        if not same_point({name: value}, {name: rule.get(name)}):
            notes.append(f"the space turns the rule's {name}={rule.get(name)} into {value}")
            log.warning("seed: %s", notes[-1])
    return SeedPoint(point, f"{RULE}:steps={base.get('steps')}", tuple(notes), RULE)


def rule_from_other_starts(space: SearchSpace, rule: SeedPoint) -> list[SeedPoint]:
    """The rule's setting again from each other shared start the space pays for (tune/starts.py).

    Why: a space that searches OWL against a uniform allocation asks which start suits the model;
    only the rule's setting from both starts answers that at equal settings (a sampled trial
    changes lr and rho too). Their kinds are ``rule/allocation:uniform`` and the like.
    """
    from tune.starts import start_variants

    seeds = []
    for values in start_variants(space) or []:
        if all(rule.point.get(name) == value for name, value in values.items()):  # the rule's own start
            continue
        seeds.append(_rule_with(rule, values))
    return seeds


def rule_alternatives(space: SearchSpace, rule: SeedPoint) -> list[SeedPoint]:
    """The rule's setting with each other value of a searched choice in ``RULE_ALTERNATIVES``.

    Why: ``loss: {choice: [ntp, ntp+kd]}`` asks whether distillation pays at the search's budget (the
    rule distils from 1,000 steps on, elsa/budget.py); a sampled trial changes lr and rho as well,
    so only the rule with the other loss answers it at equal settings. Kinds: ``rule/loss:ntp+kd``.
    """
    seeds = []
    for name in RULE_ALTERNATIVES:
        dim = space.dimensions.get(name)
        for value in dim.args if dim is not None and dim.kind == "choice" else ():
            if value != rule.point.get(name):
                seeds.append(_rule_with(rule, {name: value}))
    return seeds


def _rule_with(rule: SeedPoint, values: dict) -> SeedPoint:
    """The rule's seed with ``values`` changed: its kind ``rule`` + ``variant_label`` (e.g.
    ``rule/allocation:uniform``), which is what tune/results.py reads back to keep only them."""
    from tune.starts import variant_key, variant_label

    point = {**rule.point, **values}
    return SeedPoint(point, f"{rule.source},{variant_key(values)}", rule.notes, RULE + variant_label(values))


def seed_points(
    space: SearchSpace, base: dict, model: str, sparsity: float, median_rms: float | None
) -> list[SeedPoint]:
    """The points every search evaluates first, in order: the rule's, the rule's from each other
    shared start, the rule's with each other value of a ``RULE_ALTERNATIVES`` choice, then the
    paper's where the space searches the paper's penalty (``lmda``)."""
    rule = rule_seed(space, base, median_rms)
    seeds = [rule, *(rule_from_other_starts(space, rule) + rule_alternatives(space, rule) if rule is not None else [])]
    if "lmda" in space.dimensions:
        seeds.append(paper_seed(space, model, sparsity))
    return [seed for seed in seeds if seed is not None]
