"""The chunked frozen-head loss against the model's own ``labels=`` loss: value and gradients."""

from __future__ import annotations

import pytest
import torch

from elsa import head_loss
from elsa.distill import training_loss
from elsa.head_loss import fused_head_applies, next_token_loss
from elsa.loop import freeze_embeddings
from elsa.tiny import ARCHS, tiny_model

PLAIN_HEADS = [arch for arch in ARCHS if arch != "gemma2"]  # gemma2 soft-caps its logits


def _frozen(arch: str, seed: int = 0) -> torch.nn.Module:
    model = tiny_model(arch, 96, seed=seed)
    freeze_embeddings(model)
    return model.eval()  # no dropout (tiny OPT and GPT-2 have some): two forwards must agree


def _loss_and_grads(model, ids, fused: bool, bf16: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = next_token_loss(model, ids) if fused else model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("arch", PLAIN_HEADS)
def test_fused_loss_and_gradients_match_the_models_own_in_fp32(arch, monkeypatch):
    """Several chunks (7 rows each, the last one short) give the model's loss and gradients."""
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 7 * 96)
    model = _frozen(arch)
    assert fused_head_applies(model)
    ids = torch.randint(0, 96, (3, 17), generator=torch.Generator().manual_seed(1))
    want_loss, want = _loss_and_grads(model, ids, fused=False)
    got_loss, got = _loss_and_grads(model, ids, fused=True)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # the head is back in place


def test_bf16_gradients_differ_from_the_models_own_by_rounding_only():
    """Under bf16 autocast both paths round; each is as close to fp32 as the other."""
    model = _frozen("llama")
    ids = torch.randint(0, 96, (2, 33), generator=torch.Generator().manual_seed(2))
    _, exact = _loss_and_grads(model, ids, fused=False)
    _, own = _loss_and_grads(model, ids, fused=False, bf16=True)
    _, fused = _loss_and_grads(model, ids, fused=True, bf16=True)

    def error(grads):
        return max(float((grads[n] - exact[n]).norm() / exact[n].norm()) for n in exact)

    assert error(fused) < max(2 * error(own), 1e-3)


def test_no_grad_value_matches_and_training_loss_takes_the_fused_path(monkeypatch):
    model = _frozen("qwen2")
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = float(model(input_ids=ids, labels=ids).loss)
        assert float(next_token_loss(model, ids)) == pytest.approx(want, rel=1e-6)
    calls = []
    monkeypatch.setattr("elsa.distill.next_token_loss", lambda m, i: calls.append(i) or next_token_loss(m, i))
    cfg = type("Cfg", (), {"loss": "ntp"})()
    assert training_loss(model, ids, cfg).item() == pytest.approx(want, rel=1e-6) and len(calls) == 1


def test_trainable_or_transformed_heads_keep_the_models_own_loss():
    """A head that trains needs its own gradient; a soft-capped head's output is not the logits."""
    trainable = tiny_model("llama", 96)
    assert not fused_head_applies(trainable)
    capped = _frozen("gemma2")
    assert capped.config.final_logit_softcapping is not None and not fused_head_applies(capped)


def test_the_head_is_restored_when_the_forward_fails():
    model = _frozen("llama")
    head = model.get_output_embeddings()
    with pytest.raises(IndexError):
        next_token_loss(model, torch.full((1, 4), 10_000))
    assert model.get_output_embeddings() is head


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_perplexity_sums_match_the_full_logits(arch, monkeypatch):
    """Evaluation takes the chunked head whether or not the head trains; sums and counts agree."""
    from elsa import perplexity

    model = tiny_model(arch, 96)
    windows = torch.randint(0, 96, (5, 12), generator=torch.Generator().manual_seed(4))
    chunked = perplexity.nll_sum(model, windows, batch_size=2)
    monkeypatch.setattr(perplexity, "plain_head", lambda m: False)
    full = perplexity.nll_sum(model, windows, batch_size=2)
    assert chunked[1] == full[1] == 5 * 11
    assert chunked[0] == pytest.approx(full[0], rel=1e-6)


def test_a_forward_that_bypasses_its_head_is_refused():
    """A model whose forward never calls the module it names as its head would give no logits."""
    model = _frozen("llama")
    spare = {"head": torch.nn.Linear(model.config.hidden_size, 96, bias=False).requires_grad_(False)}
    model.get_output_embeddings = lambda: spare["head"]
    model.set_output_embeddings = lambda module: spare.update(head=module)
    with pytest.raises(RuntimeError, match="does not call its output embeddings"):
        next_token_loss(model, torch.randint(0, 96, (1, 6)))


def _distill_loss_and_grads(model, teacher, ids, cfg):
    model.zero_grad(set_to_none=True)
    loss = training_loss(model, ids, cfg, teacher)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(
    ("loss", "kd_weight", "temperature"),
    [("ntp+kd", 0.3, 2.0), ("kd", 0.5, 2.0), ("ntp+kd", 0.3, 1.0), ("kd", 0.5, 1.0)],
)
def test_chunked_distillation_matches_the_full_logits_path(arch, loss, kd_weight, temperature, monkeypatch):
    """Loss and gradients of kd and ntp+kd by row chunks equal those built from both models' full
    logits, at T = 2 (each term its own softmax) and T = 1 (one softmax shared)."""
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 5 * 96)
    model, teacher = _frozen(arch, seed=0), _frozen(arch, seed=1).requires_grad_(False)
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(5))
    cfg = type("Cfg", (), {"loss": loss, "kd_weight": kd_weight, "kd_temperature": temperature})()
    got_loss, got = _distill_loss_and_grads(model, teacher, ids, cfg)
    monkeypatch.setattr("elsa.distill.plain_head", lambda m: False)  # the full-logits path
    want_loss, want = _distill_loss_and_grads(model, teacher, ids, cfg)
    assert got_loss == pytest.approx(want_loss, rel=1e-6) and want_loss > 0.01
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_chunked_kd_is_zero_with_zero_gradient_against_itself(temperature):
    """Distilling a model into its own copy: KL 0 and no gradient, chunk by chunk."""
    from elsa.distill import frozen_teacher

    model = _frozen("qwen2")
    cfg = type("Cfg", (), {"loss": "kd", "kd_weight": 0.5, "kd_temperature": temperature})()
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(6))
    loss, grads = _distill_loss_and_grads(model, frozen_teacher(model), ids, cfg)
    assert abs(loss) < 1e-6
    assert max(float(g.abs().max()) for g in grads.values()) < 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_a_lean_teacher_gives_the_same_loss_and_gradients_under_bf16_autocast(arch):
    """A teacher whose linear layers are stored in bf16 gives the fp32 teacher's ntp+kd loss and
    student gradients bit for bit under bf16 autocast (which casts those weights anyway); what
    autocast keeps in fp32 (norms, embeddings, a head tied to them) stays fp32."""
    import copy

    from elsa.distill import frozen_teacher, lean_teacher

    model, teacher = _frozen(arch, seed=0), frozen_teacher(_frozen(arch, seed=1))
    lean = lean_teacher(copy.deepcopy(teacher))
    cfg = type("Cfg", (), {"loss": "ntp+kd", "kd_weight": 0.5, "kd_temperature": 1.0})()
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want = _distill_loss_and_grads(model, teacher, ids, cfg)
        got_loss, got = _distill_loss_and_grads(model, lean, ids, cfg)
    assert got_loss == want_loss and want_loss > 0.01
    assert want.keys() == got.keys() and all(torch.equal(got[n], want[n]) for n in want)
    tied = {id(p) for m in lean.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    linear = [m.weight for m in lean.modules() if isinstance(m, torch.nn.Linear)]
    assert arch == "gpt2" or any(w.dtype == torch.bfloat16 for w in linear)  # GPT-2's blocks are Conv1D
    assert all((w.dtype == torch.float32) == (id(w) in tied) for w in linear)
    others = [p for m in lean.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False)]
    assert others and all(p.dtype == torch.float32 for p in others)
