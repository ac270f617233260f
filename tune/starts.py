"""Which trials of a search share which one-shot warm start.

Why: the start (SparseGPT by the budget rule) costs minutes, so a search computes it once, before
any trial, and every trial loads it. That is right only for trials whose settings do not change
the start: a trial that samples another OWL allocation (``allocation``, ``owl_lambda``) must
begin from a start pruned with that allocation, or it trains towards one set of block sparsities
from a model pruned to another. So a space that searches start settings as a few choices gets
one shared start per combination (the trial picks its own); one that searches them over a range,
or in more than ``MAX_STARTS`` combinations, leaves every trial to compute its own start.
"""

from __future__ import annotations

import itertools

from tune.space import SearchSpace

# the PruneConfig fields that decide the one-shot start
START_FIELDS = frozenset(
    {
        "model",
        "sparsity",
        "pattern",
        "sparsity_map",
        "allocation",
        "owl_m",
        "owl_lambda",
        "init",
        "method_args",
        "data",
        "windows",
        "seqlen",
        "calib_blocks",
        "seed",
    }
)
MAX_STARTS = 4  # shared starts a search computes before its trials, at most


def start_variants(space: SearchSpace) -> list[dict] | None:
    """The searched start settings' combinations, one shared start each: ``[{}]`` (one start for
    all) when the space searches none; None when the trials cannot share (see the module doc)."""
    dims = [dim for name, dim in space.dimensions.items() if name in START_FIELDS]
    if any(dim.kind != "choice" for dim in dims):
        return None
    combos = [dict(zip([dim.name for dim in dims], values)) for values in itertools.product(*(d.args for d in dims))]
    return combos if len(combos) <= MAX_STARTS else None


def variant_key(values: dict) -> str:
    """A start's name among its sparsity's starts: ``""`` for the only one, else e.g.
    ``allocation=uniform,owl_lambda=0.04`` (the searched start settings, sorted)."""
    return ",".join(f"{name}={values[name]}" for name in sorted(values))


def variant_label(values: dict) -> str:
    """``variant_key`` in MLflow's key charset (no ``=`` or ``,``): ``/allocation:uniform``, or
    ``""`` for the only start; the suffix of the start's metric and of its rule seed's kind."""
    return "/" + variant_key(values).replace("=", ":").replace(",", "/") if values else ""


def label_fields(label: str) -> set[str]:
    """The start settings a ``variant_label`` names: ``/allocation:uniform`` -> ``{"allocation"}``."""
    return {part.split(":", 1)[0] for part in label.split("/")[1:]}


def trial_start_key(space: SearchSpace, sample: dict) -> str:
    """The key of the start a trial with ``sample`` (its searched values) begins from."""
    return variant_key({name: sample[name] for name in space.dimensions if name in START_FIELDS})
