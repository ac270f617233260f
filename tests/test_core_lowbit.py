"""8-bit base optimisers under ADMM: bitsandbytes' Adam8bit (CPU kernels) and torchao's AdamW8bit.

The objective-aware projection must read the v the 8-bit state really holds: checked against a
dequantisation written here from the raw codes (code book[codes] * per-block absmax), and
after one step against g^2 itself (v_hat = g^2 exactly in fp32 arithmetic).

torchao's optimiser compiles its step with torch.compile (about 45 s per tensor shape on these
CPUs); the torchao tests run the same step eagerly by making torch.compile the identity.
"""

from __future__ import annotations

import math

import pytest
import torch

from elsa import tiny
from core_settings import admm_settings
from elsa.optim.admm import ADMM, PenaltySchedule
from elsa.api import prune_model
from elsa.config import make_config
from elsa.optim.moments import second_moment
from elsa.optim.projection import topk_mask
from elsa.targets import find_targets

bnb = pytest.importorskip("bitsandbytes")
BETA2 = 0.999


def _blockwise(codes: torch.Tensor, qmap: torch.Tensor, absmax: torch.Tensor, block: int = 256) -> torch.Tensor:
    flat = qmap[codes.reshape(-1).long()]
    return (flat * absmax.repeat_interleave(block)[: flat.numel()]).view(codes.shape)


def _bnb_v_reference(state: dict) -> torch.Tensor:
    """v from bitsandbytes' state, bias-corrected: 8-bit blockwise, or fp32 for small tensors."""
    if "absmax2" in state:
        raw = _blockwise(state["state2"], state["qmap2"], state["absmax2"])
    else:
        raw = state["state2"].float()
    return raw / (1 - BETA2 ** state["step"])


def _ao_v_reference(state: dict) -> torch.Tensor:
    v = state["exp_avg_sq"]
    if type(v) is torch.Tensor:
        raw = v
    else:
        raw = _blockwise(v.codes, v.qmap, v.scale, v.block_size)
    return raw / (1 - BETA2 ** float(state["step"]))


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


def _lm_steps(model, admm, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(2, tiny.TINY_VOCAB_SIZE, (2, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        admm.step()
        admm.zero_grad()


def _check_fisher_reads_dequantised_v(admm, reference):
    checked = 0
    for target, mask in zip(admm.targets, admm.final_masks()):
        state = admm.base.state[target.param]
        v_ref = reference(state)
        v = second_moment(admm.base, target.param, BETA2)
        torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=0)
        x = target.param.detach().float()
        assert torch.equal(mask, topk_mask(v_ref * x * x, target.keep)), target.name
        checked += 1
    assert checked


# ---------------------------------------------------------------- bitsandbytes


def test_bnb_first_step_v_is_g_squared():
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 96, generator=g))
    grad = torch.randn(64, 96, generator=g)
    base = bnb.optim.Adam8bit([w], lr=1e-3, betas=(0.9, BETA2))
    from elsa.targets import Target

    target = Target("w", w, 0.5, None, 1)
    admm = ADMM(
        base, [target], admm_settings(total_steps=4, lmda=PenaltySchedule(0.0), interval=100, projection="fisher")
    )
    w.grad = grad.clone()
    admm.step()
    state = base.state[w]
    assert state["state2"].dtype == torch.uint8  # really 8-bit
    v = second_moment(base, w, BETA2)
    exact = grad * grad
    block_max = exact.reshape(-1, 256).amax(1).repeat_interleave(256).view(exact.shape)
    assert float(((v - exact).abs() / block_max).max()) < 0.01  # 8-bit error, relative to the block
    torch.testing.assert_close(v, _bnb_v_reference(state), rtol=1e-6, atol=0)


def test_bnb_adam8bit_runs_admm_on_tiny_gpt2():
    """GPT-2's tiny matrices are all >= 4096 entries: every target gets 8-bit state."""
    model = tiny.tiny_model("gpt2", tiny.TINY_VOCAB_SIZE, seed=0)
    cfg = make_config(
        {"model": "tiny", "sparsity": 0.7, "optimizer": "adam8bit", "steps": 4, "interval": 2, "lr": 1e-3}
    )
    targets = find_targets(model, 0.7)
    base = bnb.optim.Adam8bit(model.parameters(), lr=1e-3, betas=(0.9, BETA2))
    from elsa.optim.admm import ADMMSettings as S

    admm = ADMM(base, targets, S.from_config(cfg))
    _lm_steps(model, admm, 4)
    assert all(base.state[t.param]["state2"].dtype == torch.uint8 for t in targets)
    _check_fisher_reads_dequantised_v(admm, _bnb_v_reference)
    admm.final_projection()
    for t in targets:
        assert int((t.param != 0).sum()) == t.keep


def test_bnb_fp32_state_of_small_tensors_is_read():
    """bitsandbytes keeps fp32 ``state2`` (no absmax2) for tensors under 4096 entries."""
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(32, 64, generator=g))
    base = bnb.optim.Adam8bit([w], lr=1e-3, betas=(0.9, BETA2))
    w.grad = torch.randn(32, 64, generator=g)
    base.step()
    assert base.state[w]["state2"].dtype == torch.float32 and "absmax2" not in base.state[w]
    v = second_moment(base, w, BETA2)  # KeyError 'absmax2' before the fix
    torch.testing.assert_close(v, _bnb_v_reference(base.state[w]), rtol=1e-6, atol=0)


def test_bnb_adam8bit_prune_model_tiny_llama(tok):
    """End to end with the configured optimiser: Llama's k/v projections (32 x 64) are small."""
    model = tiny.tiny_model("llama", len(tok), seed=0)
    cfg = make_config(
        {
            "model": "tiny",
            "sparsity": 0.7,
            "optimizer": "adam8bit",
            "projection": "fisher",
            "z_dtype": "fp8_e4m3",
            "u_dtype": "bf16",
            "steps": 4,
            "interval": 2,
            "seqlen": 32,
            "val_blocks": 2,
            "eval_interval": 1000,
            "lr": 1e-3,
        }
    )
    result = prune_model(cfg, model=model, tokenizer=tok)
    assert result.report["all_ok"]
    assert math.isfinite(result.summary["history"][-1]["val_loss_projected"])


# ---------------------------------------------------------------- torchao


@pytest.fixture
def eager_torchao(monkeypatch):
    pytest.importorskip("torchao")
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f))
    from torchao.optim import AdamW8bit

    return AdamW8bit


def test_torchao_adamw8bit_runs_admm_on_tiny_llama(eager_torchao):
    model = tiny.tiny_model("llama", tiny.TINY_VOCAB_SIZE, seed=0)
    targets = find_targets(model, 0.7)
    base = eager_torchao(model.parameters(), lr=1e-3, betas=(0.9, BETA2), weight_decay=0.0)
    admm = ADMM(
        base,
        targets,
        admm_settings(
            total_steps=4,
            lmda=PenaltySchedule(1e-2),
            interval=2,
            projection="fisher",
            z_dtype="fp8_e4m3",
            u_dtype="bf16",
        ),
    )
    _lm_steps(model, admm, 4)
    quantised = [t for t in targets if type(base.state[t.param]["exp_avg_sq"]) is not torch.Tensor]
    assert quantised and len(quantised) < len(targets)  # both 8-bit and (small) fp32 states occur
    _check_fisher_reads_dequantised_v(admm, _ao_v_reference)
    admm.final_projection()
    for t in targets:
        assert int((t.param != 0).sum()) == t.keep
    assert all(torch.isfinite(p).all() for p in model.parameters())
