"""Resume: 2N steps in one go equal N steps, a checkpoint, a fresh model and optimiser, N steps.

Bit-for-bit (torch.equal) on the weights, z, u and the base optimiser's state, through the real
training loop (elsa.loop.train), with a cosine lambda schedule (so the dual rescale is carried),
a resume point in the middle of a z/u interval, and state formats fp32 / int8 / fp8 / sparse z.
"""

from __future__ import annotations

import io

import pytest
import torch

from elsa import tiny
from elsa.config import make_config
from elsa.loop import LoopHooks, build_admm, train

N = 5  # resume after step 5; interval 3: z/u-updates after steps 1, 4, 7, 10

CASES = {
    "fp32": dict(),
    "int8": dict(z_dtype="int8", u_dtype="int8"),
    "elsa-l-fp8-bf16": dict(z_dtype="fp8_e4m3", u_dtype="bf16"),
    "sparse-z-fp8-e5m2": dict(z_dtype="fp8_e5m2", u_dtype="int8", z_sparse=True),
    "sparse-z-fp32": dict(z_sparse=True),
    "decoupled-rho-schedule": dict(
        penalty="decoupled", rho=0.05, rho_final=0.2, rho_schedule="linear", z_dtype="fp8_e4m3", u_dtype="bf16"
    ),
    "nm-2-4": dict(pattern="2:4", sparsity=None),
    "coupled-loss-fisher": dict(fisher_source="loss", z_dtype="fp8_e4m3", u_dtype="bf16"),
    "adam8bit-magnitude": dict(
        optimizer="adam8bit", projection="magnitude", z_dtype="fp8_e4m3", u_dtype="bf16", z_sparse=True
    ),
}


def _cfg(**overrides):
    base = dict(
        model="tiny",
        sparsity=0.7,
        steps=2 * N,
        interval=3,
        lr=3e-3,
        lmda=1e-3,
        lmda_final=1e-1,
        lmda_schedule="cosine",
        seqlen=16,
        batch_size=2,
        eval_interval=1000,
        log_interval=1000,
    )
    base.update(overrides)
    return make_config(
        {k: v for k, v in base.items()},
        {"sparsity": None} if "sparsity" in overrides and overrides["sparsity"] is None else None,
    )


def _batches(step: int, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randint(2, tiny.TINY_VOCAB_SIZE, (2, 16), generator=g)


def _model(seed: int = 0):
    return tiny.tiny_model("llama", tiny.TINY_VOCAB_SIZE, seed=seed)


def _run(model, cfg, start: int, stop: int, admm=None, scheduler=None):
    if admm is None:
        admm, scheduler = build_admm(model, cfg)
    train(model, admm, scheduler, _batches, cfg.model_copy(update={"steps": stop}), LoopHooks(), start_step=start)
    return admm, scheduler


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A dtype-independent view for exact comparison (fp8 has no CPU ``equal``)."""
    t = t.detach().contiguous()
    if t.dtype.is_floating_point and t.element_size() == 1:
        return t.view(torch.uint8)
    return t


def _assert_same_state(model_a, admm_a, model_b, admm_b):
    for (name, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(pa, pb), name
    for ta, tb in zip(admm_a.targets, admm_b.targets):
        x = ta.param.detach()
        for which in ("z", "u"):
            assert torch.equal(admm_a._load(ta, which, x), admm_b._load(tb, which, x)), f"{ta.name} {which}"
        ea, eb = admm_a._admm[ta.param], admm_b._admm[tb.param]
        assert ea.keys() == eb.keys()
        for key in ea:
            assert ea[key].dtype == eb[key].dtype, key
            assert torch.equal(_bits(ea[key]), _bits(eb[key])), f"{ta.name} {key}"
    assert admm_a.admm_step == admm_b.admm_step and admm_a.lmda == admm_b.lmda and admm_a.rho == admm_b.rho
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        sa, sb = admm_a.base.state.get(pa, {}), admm_b.base.state.get(pb, {})
        assert sa.keys() == sb.keys()
        for key in sa:
            if torch.is_tensor(sa[key]):
                assert torch.equal(_bits(sa[key]), _bits(sb[key])), key
            else:
                assert sa[key] == sb[key], key
    assert [g["lr"] for g in admm_a.param_groups] == [g["lr"] for g in admm_b.param_groups]


def _serialize(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# in-memory resume is checked once (fp32); every case goes through torch.save / torch.load
RESUMES = [("fp32", False)] + [(case, True) for case in CASES]


@pytest.mark.parametrize(
    "case,serialize", RESUMES, ids=[f"{c}-{'torch.save' if s else 'in-memory'}" for c, s in RESUMES]
)
def test_resume_is_bit_exact(case, serialize):
    cfg = _cfg(**CASES[case])

    model_a = _model()
    admm_a, _ = _run(model_a, cfg, 0, 2 * N)

    model_b = _model()
    admm_b, sched_b = _run(model_b, cfg, 0, N)
    checkpoint = {"model": model_b.state_dict(), "optim": admm_b.state_dict(), "sched": sched_b.state_dict()}
    if serialize:
        checkpoint = _serialize(checkpoint)
    del model_b, admm_b, sched_b

    model_c = _model(seed=123)  # fresh weights, overwritten by the checkpoint
    model_c.load_state_dict(checkpoint["model"])
    admm_c, sched_c = build_admm(model_c, cfg)
    admm_c.load_state_dict(checkpoint["optim"])
    sched_c.load_state_dict(checkpoint["sched"])
    assert admm_c.admm_step == N
    _run(model_c, cfg, N, 2 * N, admm_c, sched_c)

    _assert_same_state(model_a, admm_a, model_c, admm_c)
    for ma, mc in zip(admm_a.final_masks(), admm_c.final_masks()):
        assert torch.equal(ma, mc)


def test_state_dict_keeps_storage_formats():
    cfg = _cfg(z_dtype="fp8_e4m3", u_dtype="int8", z_sparse=True)
    model = _model()
    admm, _ = _run(model, cfg, 0, 2)
    state = admm.state_dict()
    ordered = [p for group in admm.param_groups for p in group["params"]]  # the optimiser's own order
    index = {id(p): i for i, p in enumerate(ordered)}  # (frozen embeddings are not in it)
    target = admm.targets[0]
    saved = state["state"][index[id(target.param)]]
    assert saved["admm_z_q"].dtype == torch.float8_e4m3fn and saved["admm_z_q"].shape == target.shape
    assert saved["admm_u_q"].dtype == torch.int8 and saved["admm_u_q"].shape == target.shape
    assert "admm_z_bits" not in saved  # densified for the checkpoint
    # the densified z decodes to the same values as the live sparse one
    dense = saved["admm_z_q"].float() * saved["admm_z_scale"]
    assert torch.equal(dense, admm._load(target, "z", target.param.detach()))


def test_state_dict_does_not_write_into_the_live_base_state():
    """``state_dict()`` must not add z/u to the base optimiser's live per-parameter state.

    torch's ``Optimizer.state_dict()`` packs the *live* per-parameter dicts, so writing the
    ``admm_*`` entries into them stores a dense copy of a sparse z (and a reference to u) in
    ``base.state`` until the next checkpoint: the memory sparse z was meant to save is held again.
    """
    cfg = _cfg(z_dtype="fp8_e4m3", u_dtype="bf16", z_sparse=True)
    model = _model()
    admm, _ = _run(model, cfg, 0, 2)
    keys_before = {id(p): set(st) for p, st in admm.base.state.items()}
    admm.state_dict()
    keys_after = {id(p): set(st) for p, st in admm.base.state.items()}
    assert keys_after == keys_before
    assert not any(k.startswith("admm_") for st in admm.base.state.values() for k in st)
