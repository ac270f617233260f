"""ELSA as a registered pruning method: the ADMM loop on one process (CPU or one GPU)."""
from __future__ import annotations

import time

from elsa.loop import BatchSampler, LoopHooks, build_admm, train
from elsa.methods import register


@register("elsa")
class ELSA:
    """Surrogate-free ADMM on the model's real loss; ends with the final projection."""

    one_shot = False

    def run(self, model, tokenizer, cfg, calib, log) -> dict:
        started = time.perf_counter()
        admm, scheduler = build_admm(model, cfg)
        sampler = BatchSampler(tokenizer, cfg)
        hooks = LoopHooks(on_metrics=log)
        history = train(model, admm, scheduler, sampler, cfg, hooks, val_blocks=sampler.validation())
        admm.final_projection()
        return {"wall_s": time.perf_counter() - started, "steps": cfg.steps, "history": history}
