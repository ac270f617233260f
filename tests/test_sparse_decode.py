"""The sparse inference path: a 90%-pruned compressed export decodes like its dense export."""

from __future__ import annotations

import logging

import pytest
import torch

from elsa.api import prune_model
from elsa.config import make_config
from elsa.model_io.export import load_checkpoint, save_checkpoint
from elsa.model_io import compact_linear
from elsa.model_io.compact_linear import CompactLinear, compact_from_csr
from elsa.model_io.sparse_format import compress
from elsa.model_io.sparse_infer import (
    SparseLinear,
    csr_from_export,
    load_sparse_for_inference,
    sparse_bytes,
    sparse_pays,
)

SPARSE = (SparseLinear, CompactLinear)
needs_kernel = pytest.mark.skipif(compact_linear.native_kernel() is None, reason="no C compiler builds the kernel")
LAYOUTS = [pytest.param("compact", marks=needs_kernel), "csr"]


def _llama(tok):
    """A tiny Llama, wide enough that its block matrices prune to a real 90% (width 128, 2 layers)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def exports(tok, tmp_path_factory):
    """The same magnitude-pruned (90%) model exported compressed and dense, both fp32."""
    cfg = make_config({"model": "unused", "method": "magnitude", "calib_blocks": 2, "seqlen": 32, "sparsity": 0.9})
    model = prune_model(cfg, model=_llama(tok), tokenizer=tok).model
    root = tmp_path_factory.mktemp("sparse_decode")
    packed = save_checkpoint(model, tok, root / "compressed", export_format="compressed", dtype=torch.float32)
    dense = save_checkpoint(model, tok, root / "dense", export_format="dense", dtype=torch.float32)
    return packed, dense


def _prompt(tok, n: int = 64) -> torch.Tensor:
    text = "The river flows through the old town and the bridge carries the road over it. " * 8
    ids = tok(text, return_tensors="pt")["input_ids"][:, :n]
    assert ids.shape[1] == n
    return ids


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sparse_modules_hold_no_dense_weight(exports, layout):
    sparse = load_sparse_for_inference(exports[0], attn_implementation="eager", policy="always", layout=layout)
    kind = CompactLinear if layout == "compact" else SparseLinear
    layers = [m for n, m in sparse.named_modules() if n.startswith("model.layers.")]
    linears = [m for m in layers if isinstance(m, (torch.nn.Linear, *SPARSE))]
    assert linears and all(type(m) is kind for m in linears)
    for module in linears:
        assert not any(p.numel() == module.in_features * module.out_features for p in module.parameters())
        assert module.nnz <= 0.11 * module.in_features * module.out_features
        assert module.values.dtype == torch.float32  # an fp32 export: its values as they are
        assert module.col.dtype == (torch.int16 if layout == "compact" else torch.int32)
    assert type(sparse.lm_head) is torch.nn.Linear and type(sparse.model.embed_tokens) is torch.nn.Embedding
    assert sparse.lm_head.weight.shape == sparse.model.embed_tokens.weight.shape
    assert all(not isinstance(m, SPARSE) for n, m in sparse.named_modules() if "norm" in n)
    dense_bytes = sum(m.in_features * m.out_features * 4 for m in linears)
    # fp32 values: 8 bytes a non-zero in CSR, 6 compact (int16 columns), plus the row starts
    assert sparse_bytes(sparse) < (0.25 if layout == "csr" else 0.19) * dense_bytes
    assert sparse.sparse_summary["dense"] == [] and sparse.sparse_summary["layouts"] == {kind.__name__: 14}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_and_greedy_tokens_equal_the_dense_export(exports, tok, layout):
    sparse = load_sparse_for_inference(exports[0], attn_implementation="eager", policy="always", layout=layout)
    dense, _ = load_checkpoint(exports[1], dtype=torch.float32, attn_implementation="eager")
    ids = _prompt(tok)
    with torch.no_grad():
        a, b = dense(ids).logits, sparse(ids).logits
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        one = ids[:, :1]  # the one-token (matrix-vector) path too
        torch.testing.assert_close(sparse(one).logits, dense(one).logits, rtol=1e-4, atol=1e-4)
    settings = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    want = dense.generate(ids, attention_mask=torch.ones_like(ids), **settings)
    got = sparse.generate(ids, attention_mask=torch.ones_like(ids), **settings)
    assert got.shape == (1, 104)
    assert torch.equal(got, want)


def _compact(weight: torch.Tensor) -> CompactLinear:
    """The compact module of ``weight`` through the export's own compression."""
    stored, _ = compress({"w": weight})
    csr = csr_from_export(stored["w.bitmask"], stored["w.values"], weight.shape)
    return CompactLinear(*compact_from_csr(*csr), weight.shape)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(5, 40_000), (37, 200)])
def test_compact_product_against_float64(shape, dtype):
    """Columns past 32,767 (their int16 patterns are negative) and widths not a multiple of 64; one and many tokens."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator)
    weight[torch.rand(*shape, generator=generator) < 0.9] = 0
    weight = weight.to(dtype)
    module = _compact(weight)
    assert module.values.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    assert module.nnz == int((weight != 0).sum())
    for tokens in (1, 3, 70):  # 70: more than one token chunk of the kernel
        x = torch.randn(2, tokens, shape[1], generator=generator)
        want = x.double() @ weight.double().t()
        got = module(x)
        assert got.shape == (2, tokens, shape[0])
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * shape[1] ** 0.5)


@needs_kernel
def test_compact_module_survives_dtype_casts_and_refuses_other_devices():
    weight = torch.zeros(8, 64)
    weight[::2, ::3] = 1.5
    module = _compact(weight.bfloat16())
    module.to(torch.float16)  # what model.half() does: values the kernel cannot read would crash it
    assert module.values.dtype == torch.float32
    torch.testing.assert_close(module(torch.ones(1, 64)), torch.ones(1, 64) @ weight.t())
    with pytest.raises(RuntimeError, match="CPU only"):
        module(torch.ones(1, 64, device="meta"))


def test_without_the_kernel_the_loader_falls_back_to_csr(exports, monkeypatch, caplog):
    monkeypatch.setattr(compact_linear, "_LIB", False)  # forget the built kernel for this test
    monkeypatch.setenv(compact_linear.CACHE_ENV, "off")
    with caplog.at_level(logging.INFO, logger="elsa.model_io.compact_linear"):
        model = load_sparse_for_inference(exports[0], policy="always")
    assert model.sparse_summary["layouts"] == {"SparseLinear": 14}
    assert "CSR layout" in caplog.text


def test_bf16_export_keeps_its_dtype_outside_the_sparse_modules(exports, tok, tmp_path):
    dense, _ = load_checkpoint(exports[1], dtype=torch.float32)
    packed = save_checkpoint(dense, tok, tmp_path / "bf16", export_format="compressed", dtype=torch.bfloat16)
    sparse = load_sparse_for_inference(packed, policy="always")
    assert sparse.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = sparse(_prompt(tok, 16)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_where_sparse_does_not_pay_the_matrix_stays_dense_and_it_is_said(exports, caplog):
    assert sparse_pays(4096, 4096, 0.9, threads=1) and not sparse_pays(4096, 4096, 0.3, threads=1)
    level = 1 - (4096 * 4096 - int(0.8 * 4096 * 4096)) / (4096 * 4096)  # floor(0.8 n) zeros: a hair under 0.8
    assert level < 0.8 and sparse_pays(4096, 4096, level, threads=1, layout="csr")
    assert not sparse_pays(4096, 4096, 0.79, threads=1, layout="csr")
    # the compact kernel pays from 70% on wide matrices, from 80% on small ones, from 60% at 2 threads
    assert sparse_pays(2048, 5632, 0.7, threads=1) and not sparse_pays(576, 1536, 0.7, threads=1)
    assert sparse_pays(576, 1536, 0.6, threads=2) and not sparse_pays(576, 1536, 0.6, threads=2, layout="csr")
    with caplog.at_level(logging.WARNING, logger="elsa.model_io.sparse_infer"):
        model = load_sparse_for_inference(exports[0], policy="never")
    assert not any(isinstance(m, SPARSE) for m in model.modules())
    kept = load_sparse_for_inference(exports[0], policy="auto")
    assert len(kept.sparse_summary["sparse"]) + len(kept.sparse_summary["dense"]) == 14
    reference, _ = load_checkpoint(exports[1], dtype=torch.float32)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, reference.model.layers[0].mlp.up_proj.weight)


def test_decode_speed_measures_sparse_and_dense_in_their_own_processes(exports):
    from pipelines.evals.speed import decode_speed

    metrics = decode_speed(str(exports[0]), new_tokens=8, repeats=1)
    for kind in ("sparse", "dense"):
        assert metrics[f"speed_{kind}_tokens_per_s"] > 0 and 100 < metrics[f"speed_{kind}_peak_rss_mb"] < 20_000
    assert metrics["speed_same_tokens"] == 1.0 and metrics["speed_sparse_over_dense"] > 0
    dense_only = decode_speed(str(exports[1]), new_tokens=4, repeats=1)
    assert "speed_sparse_tokens_per_s" not in dense_only and dense_only["speed_dense_tokens_per_s"] > 0


@pytest.mark.ray
def test_speed_runs_as_a_ray_evaluation_task(exports, ray_session):
    from elsa.config import make_eval_settings
    from pipelines.evals.evaluation import run_evaluation

    settings = make_eval_settings({"eval_datasets": [], "eval_speed": True})
    metrics, errors = run_evaluation(str(exports[0]), settings)
    assert errors == {}
    assert metrics["speed_same_tokens"] == 1.0
    assert {"speed_sparse_tokens_per_s", "speed_dense_peak_rss_mb", "speed_rss_sparse_over_dense"} <= set(metrics)


def test_elsa_generate_prints_the_sparse_models_completion(exports, capsys):
    from cli.main import main
    from pipelines.evals.speed import complete

    argv = ["generate", "--checkpoint", str(exports[0]), "--prompt", "The river", "--max-new-tokens", "6"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.strip()
    assert printed and printed == complete(str(exports[1]), "The river", 6).strip()
