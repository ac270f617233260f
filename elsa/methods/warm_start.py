"""Warm start: begin ADMM from a one-shot method's sparse solution, and never end worse than it.

Why: on a small budget ADMM from the dense model spends its steps pulling x towards a sparse z
that starts as plain magnitude pruning; a layer-wise method (SparseGPT) gets a far better sparse
model in minutes. Started from it (x0 = its reconstructed weights, so z0 = Proj(x0) = x0 and
u0 = 0), ADMM trains the sparse model on the real loss and may still move the mask. The run then
keeps whichever is better on held-out calibration text: its own final projection or the start.
"""

from __future__ import annotations

import time

import torch

from elsa.text.data import calibration_blocks


def one_shot_start(model: torch.nn.Module, tokenizer, cfg, log=None) -> float:
    """Prune ``model`` in place with ``cfg.init`` on ``cfg.calib_blocks`` blocks; returns seconds."""
    from elsa.methods import method_for  # lazily: the package imports this module through admm_method

    started = time.perf_counter()
    calib = calibration_blocks(tokenizer, cfg.data, cfg.calib_blocks, cfg.seqlen, cfg.seed, windows=cfg.windows)
    method_for(cfg, cfg.init).run(model, tokenizer, cfg.model_copy(update={"method": cfg.init}), calib, log)
    return time.perf_counter() - started


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer (to restore the start if it wins)."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def kept_solution(start_loss: float, final_loss: float) -> str:
    """``"elsa"`` if the final projection's held-out loss is at most the start's, else ``"init"``.

    A non-finite final loss never wins.
    """
    final_ok = final_loss == final_loss and final_loss != float("inf")
    return "elsa" if final_ok and final_loss <= start_loss else "init"
