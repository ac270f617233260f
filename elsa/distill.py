"""The training loss of the x-update: next-token prediction, distillation, or a mix.

Distillation uses the dense starting model as the teacher (frozen, no grad): its full output
distribution carries far more signal per token than the one-hot next token, which matters when
a run sees a few hundred thousand tokens. The KD term is the usual T^2 * KL(p_teacher || p_student)
at temperature T, averaged over predicted tokens; it is 0, with zero gradient, when the student
equals the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from elsa.head_loss import distillation_loss, fused_head_applies, next_token_loss, plain_head


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over positions of KL(softmax(teacher / T) || softmax(student / T))."""
    t = temperature
    log_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1)
    return kl.mean() * (t * t)


def training_loss(model, ids: torch.Tensor, cfg, teacher=None) -> torch.Tensor:
    """The loss of one micro-batch under ``cfg.loss`` (the teacher is needed for kd, ntp+kd)."""
    if cfg.loss == "ntp":
        return next_token_loss(model, ids) if fused_head_applies(model) else model(input_ids=ids, labels=ids).loss
    if teacher is None:
        raise ValueError(f"loss={cfg.loss} needs the dense teacher model")
    ntp_share, kd_share = (0.0, 1.0) if cfg.loss == "kd" else (1.0 - cfg.kd_weight, cfg.kd_weight)
    if fused_head_applies(model) and plain_head(teacher):
        return distillation_loss(model, teacher, ids, ntp_share, kd_share, cfg.kd_temperature)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits[:, :-1]
    out = model(input_ids=ids, labels=ids)
    kd = kd_term(out.logits[:, :-1], teacher_logits, cfg.kd_temperature)
    return kd if not ntp_share else ntp_share * out.loss + kd_share * kd


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with no parameter requiring grad (a teacher), in place."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def frozen_teacher(model: torch.nn.Module, bf16: bool = False) -> torch.nn.Module:
    """A frozen copy of ``model`` (the dense starting weights); ``bf16``: the run's forward is
    under bf16 autocast, so its linear layers are stored in bf16 (``lean_teacher``)."""
    import copy

    teacher = freeze(copy.deepcopy(model))
    return lean_teacher(teacher) if bf16 else teacher


def lean_teacher(teacher: torch.nn.Module) -> torch.nn.Module:
    """``teacher`` with its linear layers' weights stored in bf16, in place, for forwards under bf16 autocast.

    Why: autocast casts a frozen fp32 weight to bf16 at every forward (it caches only weights that
    need grad), so storing the linear layers in bf16 gives the same logits bit for bit, without
    the per-step casts and at half their memory: a 7B teacher beside its student holds 14 GB
    instead of 28, the difference between fitting one 80 GB GPU with ELSA-L's states or not. What
    autocast runs in fp32 stays fp32: norms, embeddings and a head tied to the embeddings. Not for
    a run without autocast (its teacher computes in fp32), nor under FSDP, whose units hold one
    parameter dtype each.
    """
    elsewhere = {
        id(param)
        for module in teacher.modules()
        if not isinstance(module, torch.nn.Linear)
        for param in module.parameters(recurse=False)
    }
    for module in teacher.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in elsewhere:
            module.to(torch.bfloat16)
    return teacher
