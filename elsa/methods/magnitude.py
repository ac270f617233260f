"""Magnitude pruning: per matrix, keep the entries of largest |W|.

The simplest baseline and the one every other method must beat. It needs no calibration data
(``calib`` is accepted and ignored) and no layer-by-layer pass: each matrix is independent.
"""

from __future__ import annotations

import time

import torch

from elsa.methods import OneShotMethod, register
from elsa.methods.layerwise import apply_mask, score_mask
from elsa.methods.settings import MagnitudeSettings
from elsa.optim.projection import magnitude_score
from elsa.targets import config_targets, verify_sparsity


@register("magnitude")
class Magnitude(OneShotMethod):
    Settings = MagnitudeSettings

    def run(self, model: torch.nn.Module, tokenizer, cfg, calib: torch.Tensor, log) -> dict:
        start = time.perf_counter()
        targets = config_targets(model, cfg)
        with torch.no_grad():
            for target in targets:
                apply_mask(target, score_mask(magnitude_score(target.param), target))
        report = verify_sparsity(targets)
        summary = {"wall_s": time.perf_counter() - start, "sparsity": report["overall_sparsity"]}
        if log is not None:
            log(summary, 0)
        return summary
