"""The first point of every search: the paper's Table 5 setting for the nearest model and sparsity.

Why: the published setting is the best prior anyone has; evaluating it first (Tune's
``points_to_evaluate``) makes every search at least as good as the paper's choice on this budget,
and gives the searcher a real baseline to beat. Only the searched keys are taken from the table:
the paper's budget (4096 steps x 8 x 2048 tokens) is not imposed on the user's trials.
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


@dataclass(frozen=True)
class SeedPoint:
    """The sample to evaluate first, and where it came from (e.g. ``paper:facebook/opt-125m@0.7``)."""

    point: dict
    source: str
    notes: tuple[str, ...] = ()


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


def paper_seed(space: SearchSpace, model: str, sparsity: float) -> SeedPoint:
    """Table 5's setting as a point of ``space`` (keys the table does not set get a neutral value).

    The space's ``lmda`` is the value the schedule ends at, which is the table's lambda for every
    schedule (cosine rises from 0 to it). A table value outside a searched range is kept (the
    searcher evaluates it as given) with a note; a choice that does not offer the table's value
    gets the dimension's neutral value instead, with a note.
    """
    preset = paper_preset(model, sparsity, count_parameters(model))
    table = dict(preset)
    if table.get("lmda_schedule", "constant") != "constant":
        table["lmda"] = table["lmda_final"]
    point, notes = {}, []
    for name, dim in space.dimensions.items():
        if name not in table:
            point[name] = dim.neutral()
            continue
        value = table[name]
        if dim.kind == "choice" and value not in dim.args:
            notes.append(
                f"the paper's {name}={value} is not among the choices {list(dim.args)}; the seed uses {dim.neutral()}"
            )
            point[name] = dim.neutral()
            continue
        if dim.kind != "choice" and not dim.contains(value):
            notes.append(
                f"the paper's {name}={value:g} lies outside the searched range {list(dim.args)}; evaluated as given"
            )
        point[name] = value
    for note in notes:
        log.warning("seed: %s", note)
    return SeedPoint(point, preset["preset"], tuple(notes))
