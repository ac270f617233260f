"""Next-token loss without the full logits: the frozen output head and cross-entropy by row chunks.

Why: on a large-vocabulary model the logits of one micro-batch dwarf everything else a step
touches. Gemma-3-270M (262k tokens, tied head) at 2 x 256 tokens: 268 MB of bf16 logits, their
537 MB fp32 copy, the log-softmax and the gradient of each, every step; on a CPU the step's time
went to moving and page-faulting those, not to the matmuls (bench/results/NOTES.md, 2026-12-06).

The head is frozen by default (``train_embeddings`` off, elsa/loop.py), so the loss needs no
gradient for it, only for the hidden states: dL/dh = (softmax(h W^T) - onehot) W / n. Each chunk
of rows computes its logits, its share of the loss and that gradient in the forward, and drops
the logits; the backward is one multiply. The arithmetic is the standard path's (logits in the
autocast dtype, softmax in fp32, the gradient cast back before the matmul with W), so results
agree with it to rounding (tests/test_head_loss.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

CHUNK_ELEMENTS = 1 << 24  # logits a chunk holds (64 MB in fp32): rows = CHUNK_ELEMENTS // vocab
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # applied to the head's output


class _ChunkedHeadNLL(torch.autograd.Function):
    """Mean NLL of ``targets`` under ``hidden @ weight.T``; the gradient for ``hidden`` only."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int):
        n = targets.numel()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, n, rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad is None:
                continue
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs[torch.arange(t.numel(), device=t.device), t] -= 1.0
            grad[start : start + rows] = probs.div_(n).to(weight.dtype) @ weight
        if grad is not None:
            ctx.save_for_backward(grad)
        return total / n

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def plain_head(model: torch.nn.Module) -> bool:
    """The head is a bias-free linear map whose output the model's forward uses unchanged."""
    if not hasattr(model, "get_output_embeddings") or not hasattr(model, "set_output_embeddings"):
        return False
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    config = getattr(model, "config", None)
    return not any(getattr(config, name, None) is not None for name in _LOGIT_TRANSFORMS)


def fused_head_applies(model: torch.nn.Module) -> bool:
    """A plain head that is frozen: training needs no gradient for it (elsa/loop.py freeze_embeddings)."""
    return plain_head(model) and not model.get_output_embeddings().weight.requires_grad


class _HiddenOut(torch.nn.Module):
    """Stands in for the head during a forward: returns the final hidden states as the output."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.head = head
        self.called = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.called = True
        return hidden


@contextmanager
def _hidden_output(model: torch.nn.Module):
    """The model's forward returns the final hidden states in place of logits, inside the block.

    The forward still runs through the model's own ``__call__``, so FSDP gathers the root's
    parameters (the head among them) and hooks the backward as for any output.
    """
    head = model.get_output_embeddings()
    stand_in = _HiddenOut(head)
    model.set_output_embeddings(stand_in)
    try:
        yield head
    finally:
        model.set_output_embeddings(head)
    if not stand_in.called:
        raise RuntimeError(
            f"{type(model).__name__}'s forward does not call its output embeddings module: "
            "the chunked head loss (elsa/head_loss.py) cannot stand in for it; report the architecture"
        )


def next_token_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of ``ids`` (what ``model(input_ids=ids, labels=ids).loss`` gives)."""
    with _hidden_output(model) as head:
        hidden = model(input_ids=ids).logits
        weight = head.weight
    width, device = hidden.shape[-1], hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    hidden = hidden[:, :-1].reshape(-1, width)
    targets = ids[:, 1:].reshape(-1)
    rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    with torch.autocast(device, enabled=False):
        loss = _ChunkedHeadNLL.apply(hidden.to(dtype), weight.detach().to(dtype), targets, rows)
    return loss


def next_token_nll_sum(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Summed next-token NLL over every predicted token of ``ids``, without grad (perplexity)."""
    with torch.no_grad():
        mean = next_token_loss(model, ids)
    return float(mean.double()) * ids.shape[0] * (ids.shape[1] - 1)
