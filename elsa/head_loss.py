"""Next-token and distillation losses without the full logits: the frozen head, by row chunks.

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

Distillation adds the dense teacher's logits, built chunk by chunk from its final hidden states the
same way; KD's gradient for the student's logits is T * (softmax(z_s / T) - softmax(z_t / T)) / n.
Without it a KD step on Gemma-3-270M built both models' full logits and took 3x an ntp step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch

CHUNK_ELEMENTS = 1 << 24  # logits a chunk holds (64 MB in fp32): rows = CHUNK_ELEMENTS // vocab
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # applied to the head's output


class _Mix(NamedTuple):
    """What a chunk's loss is made of: ntp's share, KD's share, and the teacher's side of KD."""

    ntp: float = 1.0
    kd: float = 0.0
    temperature: float = 1.0
    teacher_hidden: torch.Tensor | None = None
    teacher_weight: torch.Tensor | None = None


def _ntp_chunk(logits: torch.Tensor, targets: torch.Tensor, want_grad: bool):
    """Summed NLL of the chunk's rows and its gradient for the logits (softmax - onehot), in place of them."""
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    if not want_grad:
        return loss, None
    probs = logits.sub_(lse[:, None]).exp_()
    probs[torch.arange(targets.numel(), device=targets.device), targets] -= 1.0
    return loss, probs


def _kl_sum(teacher_logits: torch.Tensor, log_student: torch.Tensor):
    """Summed KL(q_teacher || q_student) over the rows, and q_teacher (computed in place where it can)."""
    log_teacher = torch.log_softmax(teacher_logits, dim=-1)
    teacher_probs = log_teacher.exp()
    return log_teacher.sub_(log_student).mul_(teacher_probs).sum(), teacher_probs


def _kd_chunk(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, want_grad: bool):
    """Summed T^2 * KL(q_teacher || q_student) of the chunk's rows and its gradient T * (q_s - q_t)."""
    t = temperature
    log_student = torch.log_softmax(logits / t, dim=-1)
    kl, teacher_probs = _kl_sum(teacher_logits.div_(t), log_student)
    if not want_grad:
        return kl * (t * t), None
    return kl * (t * t), log_student.exp_().sub_(teacher_probs).mul_(t)


def _shared_softmax_terms(logits, targets, teacher_logits, mix: _Mix, want_grad: bool):
    """KD at T = 1 (the default) and ntp from one log-softmax of the student's logits: the loss
    ntp * NLL + kd * KL, the gradient (ntp + kd) * q_s - kd * q_t - ntp * onehot. Fewer passes
    over the chunk than each term on its own (a Gemma chunk is 64 x 262k floats)."""
    log_student = torch.log_softmax(logits, dim=-1)
    nll = -log_student.gather(1, targets[:, None]).sum()
    kl, teacher_probs = _kl_sum(teacher_logits, log_student)
    loss = mix.ntp * nll + mix.kd * kl
    if not want_grad:
        return loss, None
    grad = log_student.exp_().mul_(mix.ntp + mix.kd).sub_(teacher_probs, alpha=mix.kd)
    grad[torch.arange(targets.numel(), device=targets.device), targets] -= mix.ntp
    return loss, grad


def _chunk_terms(logits, targets, teacher_logits, mix: _Mix, want_grad: bool):
    """The chunk's summed loss under ``mix`` and, if wanted, its gradient for the logits.

    KD runs first: it leaves the logits intact, which ntp then overwrites with its gradient.
    """
    if mix.kd and mix.temperature == 1:
        return _shared_softmax_terms(logits, targets, teacher_logits, mix, want_grad)
    terms = []
    if mix.kd:
        terms.append((mix.kd, *_kd_chunk(logits, teacher_logits, mix.temperature, want_grad)))
    if mix.ntp:
        terms.append((mix.ntp, *_ntp_chunk(logits, targets, want_grad)))
    loss = sum(share * value for share, value, _ in terms)
    if not want_grad:
        return loss, None
    grad = terms[0][2].mul_(terms[0][0])
    for share, _, term_grad in terms[1:]:
        grad.add_(term_grad, alpha=share)
    return loss, grad


class _ChunkedHeadLoss(torch.autograd.Function):
    """``mix.ntp`` * mean NLL + ``mix.kd`` * mean KD of ``hidden @ weight.T``; the gradient for ``hidden`` only."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int, mix: _Mix):
        n = targets.numel()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        for start in range(0, n, rows):
            chunk = slice(start, start + rows)
            logits = (hidden[chunk] @ weight.T).float()
            teacher_logits = (mix.teacher_hidden[chunk] @ mix.teacher_weight.T).float() if mix.kd else None
            loss, dlogits = _chunk_terms(logits, targets[chunk], teacher_logits, mix, want_grad)
            total += loss
            if want_grad:
                grad[chunk] = dlogits.div_(n).to(weight.dtype) @ weight
        if want_grad:
            ctx.save_for_backward(grad)
        return total / n

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


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


def _final_hidden(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows that predict a next token (all but each window's last) and the head's weight."""
    with _hidden_output(model) as head:
        hidden = model(input_ids=ids).logits
        weight = head.weight
    return hidden[:, :-1].reshape(-1, hidden.shape[-1]), weight


def _chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, mix: _Mix) -> torch.Tensor:
    """The loss of ``mix`` over row chunks, in the autocast dtype where autocast is on (as the head's matmul)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    if mix.kd:
        mix = mix._replace(
            teacher_hidden=mix.teacher_hidden.to(dtype), teacher_weight=mix.teacher_weight.detach().to(dtype)
        )
    rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    with torch.autocast(device, enabled=False):
        return _ChunkedHeadLoss.apply(hidden.to(dtype), weight.detach().to(dtype), ids[:, 1:].reshape(-1), rows, mix)


def next_token_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of ``ids`` (what ``model(input_ids=ids, labels=ids).loss`` gives)."""
    hidden, weight = _final_hidden(model, ids)
    return _chunked_loss(hidden, weight, ids, _Mix())


def distillation_loss(model, teacher, ids: torch.Tensor, ntp: float, kd: float, temperature: float) -> torch.Tensor:
    """``ntp`` * next-token NLL + ``kd`` * T^2 KL(teacher || student), neither model's logits built whole.

    The teacher's final hidden states come from its own forward (no grad); each chunk of rows
    builds both models' logits, takes its share of the two terms and of the gradient, and drops them.
    """
    with torch.no_grad():
        teacher_hidden, teacher_weight = _final_hidden(teacher, ids)
    hidden, weight = _final_hidden(model, ids)
    return _chunked_loss(hidden, weight, ids, _Mix(ntp, kd, temperature, teacher_hidden, teacher_weight))


def next_token_nll_sum(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Summed next-token NLL over every predicted token of ``ids``, without grad (perplexity)."""
    with torch.no_grad():
        mean = next_token_loss(model, ids)
    return float(mean.double()) * ids.shape[0] * (ids.shape[1] - 1)
