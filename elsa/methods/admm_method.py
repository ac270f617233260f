"""ELSA as a registered pruning method: the ADMM loop on one process (CPU or one GPU)."""

from __future__ import annotations

import time

from elsa.distill import frozen_teacher
from elsa.loop import BatchSampler, LoopHooks, build_admm, train, use_bf16
from elsa.methods import register
from elsa.methods.warm_start import kept_solution, one_shot_start, snapshot
from elsa.perplexity import mean_nll


@register("elsa")
class ELSA:
    """Surrogate-free ADMM on the model's real loss; ends with the final projection.

    With ``cfg.init`` it starts from that one-shot method's solution and keeps the better of
    (final projection, start) by held-out loss (elsa/methods/warm_start.py).
    """

    one_shot = False

    def run(self, model, tokenizer, cfg, calib, log) -> dict:
        started = time.perf_counter()
        sampler = BatchSampler(tokenizer, cfg)
        val_blocks = sampler.validation()
        bf16 = use_bf16(cfg, next(model.parameters()).device)
        teacher = frozen_teacher(model, bf16) if cfg.loss != "ntp" else None
        summary: dict = {"init": cfg.init, "loss": cfg.loss}
        start = None
        if cfg.init != "none":
            summary["init_s"] = one_shot_start(model, tokenizer, cfg)
            summary["init_val_loss"] = mean_nll(model, val_blocks)
            start = snapshot(model)
        admm, scheduler = build_admm(model, cfg)
        hooks = LoopHooks(on_metrics=log or (lambda metrics, step: None))
        history = train(model, admm, scheduler, sampler, cfg, hooks, val_blocks=val_blocks, teacher=teacher)
        admm.final_projection()
        summary["final_val_loss_projected"] = mean_nll(model, val_blocks)
        if start is not None:
            summary["kept"] = kept_solution(summary["init_val_loss"], summary["final_val_loss_projected"])
            if summary["kept"] == "init":
                model.load_state_dict(start)
        return {**summary, "wall_s": time.perf_counter() - started, "steps": cfg.steps, "history": history}
