"""The single-process entry points: prune a model, evaluate it.

Used by notebooks, tests, the benchmark and (piece by piece) the Ray worker::

    from elsa import PruneConfig, prune_model
    result = prune_model(PruneConfig(model="smollm2-135m", sparsity=0.7, steps=100))
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from elsa.config import PruneConfig
from elsa.methods import method_for
from elsa.model_io.models import load_model, load_tokenizer
from elsa.perplexity import perplexity
from elsa.weight_scale import resolve_on_dense
from elsa.targets import config_targets, verify_sparsity
from elsa.text.data import DEFAULT_WINDOWS, calibration_blocks, eval_windows


@dataclass
class PruneResult:
    model: torch.nn.Module
    tokenizer: object
    report: dict  # per-matrix sparsity (elsa.targets.sparsity_report)
    summary: dict  # the method's numbers (wall time, history...)
    wall_s: float
    cfg: PruneConfig  # the run's config, its allocation and lr resolved (elsa/weight_scale.py)
    weight_rms: float  # the dense model's median weight RMS, which an unset lr was scaled by


def prune_model(cfg: PruneConfig, model=None, tokenizer=None, log=None) -> PruneResult:
    """Prune ``model`` (loaded from ``cfg.model`` when not given) in place; verify sparsity."""
    model = model if model is not None else load_model(cfg.model)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    method = method_for(cfg)
    started = time.perf_counter()
    cfg, weight_rms = resolve_on_dense(model, tokenizer, cfg)
    calib = (
        calibration_blocks(tokenizer, cfg.data, cfg.calib_blocks, cfg.seqlen, cfg.seed, windows=cfg.windows)
        if method.one_shot
        else None
    )
    summary = method.run(model, tokenizer, cfg, calib, log or (lambda metrics, step: None))
    wall = time.perf_counter() - started
    report = verify_sparsity(config_targets(model, cfg))
    return PruneResult(model, tokenizer, report, summary, wall, cfg, weight_rms)


def evaluate_perplexity(
    model,
    tokenizer,
    datasets: list[str],
    seqlen: int,
    max_windows: int | None = None,
    windows: str = DEFAULT_WINDOWS,
) -> dict[str, float]:
    """``{"ppl_<dataset>": value}`` over non-overlapping windows (``windows``: the BOS protocol,
    elsa/text/data.py)."""
    results = {}
    for name in datasets:
        cut = eval_windows(tokenizer, name, seqlen, max_windows=max_windows, windows=windows)
        results[f"ppl_{name}"] = perplexity(model, cut)
    return results
