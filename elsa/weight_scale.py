"""The scale of the weights a run prunes, measured on the dense model: what an unset lr follows.

Why: Adam moves a weight by about lr a step whatever its size, so the budget rule's lr, chosen on
SmolLM2-135M, is scaled by the ratio of the median RMS of the pruned matrices (elsa/budget.py,
``scaled_lr``). The median is taken before anything is pruned; a run that starts from a saved
one-shot solution instead of the dense model (the pipeline's warm start, Tune's shared start)
reads it from ``WEIGHT_SCALE_FILE``, written beside that solution.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

WEIGHT_SCALE_FILE = "weight_scale.json"  # {"median_rms": ...} of the dense model's target matrices


def weight_rms(targets) -> list[float]:
    """Each target matrix's root mean square (float64, deterministic)."""
    with torch.no_grad():
        return [float(t.param.detach().double().pow(2).mean().sqrt()) for t in targets]


def median_weight_rms(targets) -> float:
    """Median over the target matrices of each one's root mean square: what the rule's lr follows."""
    return statistics.median(weight_rms(targets))


def resolve_lr(cfg, median_rms: float | None, source: str = "the dense model"):
    """``cfg`` with the rule's lr for weights of ``median_rms`` when its lr is unset; else ``cfg``."""
    from elsa.budget import scaled_lr

    if cfg.lr is not None:
        return cfg
    if median_rms is None:
        raise ValueError(f"lr is unset and {source} carries no {WEIGHT_SCALE_FILE} to scale it by: pass --lr")
    return cfg.model_copy(update={"lr": scaled_lr(median_rms)})


def write_weight_scale(directory: str | Path, median_rms: float) -> None:
    (Path(directory) / WEIGHT_SCALE_FILE).write_text(json.dumps({"median_rms": median_rms}) + "\n")


def parse_weight_scale(text: str) -> float:
    """The median RMS in the text of a ``WEIGHT_SCALE_FILE``."""
    return float(json.loads(text)["median_rms"])


def read_weight_scale(directory: str | Path) -> float | None:
    """The dense model's median RMS saved beside a solution, or None (none was saved)."""
    path = Path(directory) / WEIGHT_SCALE_FILE
    return parse_weight_scale(path.read_text()) if path.is_file() else None


def resolve_on_dense(model, tokenizer, cfg):
    """What the rule resolves on the still-dense ``model``: the OWL allocation and the lr.
    Returns (cfg resolved, the median weight RMS)."""
    from elsa.allocation import resolve_allocation
    from elsa.targets import config_targets

    cfg = resolve_allocation(model, tokenizer, cfg)
    median_rms = median_weight_rms(config_targets(model, cfg))
    return resolve_lr(cfg, median_rms), median_rms
