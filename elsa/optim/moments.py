"""Adam's second moment v, read from whichever base optimiser holds it.

The objective-aware projection ranks entries by v * x^2. torch's Adam/AdamW keep v as
``exp_avg_sq``; torchao's 8-bit AdamW keeps it as a quantised tensor subclass under the same
name; bitsandbytes' 8-bit Adam keeps it blockwise-quantised as ``state2`` with ``absmax2``.
All are returned as this rank's fp32 shard, bias-corrected.
"""

from __future__ import annotations

import torch

from elsa.distributed import local


def _dequantize_bnb(state: dict) -> torch.Tensor:
    if "absmax2" not in state:  # bitsandbytes keeps small tensors' (< 4096 entries) state in fp32
        return state["state2"]
    import bitsandbytes.functional as bnbf  # optional dependency, only for bnb optimisers

    return bnbf.dequantize_blockwise(state["state2"], absmax=state["absmax2"], code=state["qmap2"], blocksize=256)


def second_moment(optimizer: torch.optim.Optimizer, param: torch.Tensor, beta2: float) -> torch.Tensor | None:
    """Bias-corrected v for ``param`` (local shard, fp32), or None before the first step."""
    state = optimizer.state.get(param)
    if not state:
        return None
    if "exp_avg_sq" in state:
        v = local(state["exp_avg_sq"])
        if type(v) is not torch.Tensor:  # torchao's quantised state subclass
            v = v.dequantize() if hasattr(v, "dequantize") else v.float()
        v = v.float()
    elif "state2" in state:
        v = _dequantize_bnb(state).float()
    else:
        return None
    step = state.get("step", 1)
    step = float(step.item() if isinstance(step, torch.Tensor) else step)
    return v / (1.0 - beta2 ** max(step, 1.0))
