"""Tiny models and a tiny tokenizer, built here from configs, for tests and CI smoke runs.

Why: the hub is out of reach here, and tests need real transformer architectures (the same module
names, Conv1D in GPT-2, grouped-query attention, tied embeddings, soft-capping in Gemma-2) that run
a forward pass in milliseconds. The tokenizer is a real byte-level BPE trained on the bundled
Wikipedia text, so token statistics look like those of a real model, only with a small vocabulary.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import torch

CORPORA = Path(__file__).resolve().parent / "text" / "corpora"
TINY_VOCAB_SIZE = 1024
# Trained first, so their ids are fixed: 0 and 1. tiny_model() uses the same ids.
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
EOS_ID, PAD_ID = 0, 1
_TRAIN_CHARS = 400_000
_CHUNK = 10_000

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, MAX_POSITIONS = 64, 2, 4, 2, 128, 1024
ARCHS = ("llama", "opt", "gemma2", "qwen2", "qwen3", "mistral", "gpt2")


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    """Train once per process; the serialised form is cached so every caller gets a fresh copy."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with gzip.open(CORPORA / "enwiki-sample.txt.gz", "rt", encoding="utf-8") as handle:
        text = handle.read(_TRAIN_CHARS)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chunks = (text[i : i + _CHUNK] for i in range(0, len(text), _CHUNK))
    tokenizer.train_from_iterator(chunks, trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer(add_bos: bool = False):
    """A byte-level BPE tokenizer (vocab 1024) trained on the bundled enwiki sample; deterministic.

    eos = bos = ``<|endoftext|>`` (id 0), pad = ``<|pad|>`` (id 1); no special tokens are added
    when encoding, as with GPT-2. ``add_bos``: BOS is put before every text encoded, as Gemma's and
    Llama's tokenizers do (for the window protocol's tests).
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_tiny_tokenizer_json())
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{EOS_TOKEN} $A", pair=f"{EOS_TOKEN} $A $B", special_tokens=[(EOS_TOKEN, EOS_ID)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        model_max_length=MAX_POSITIONS,
        name_or_path="elsa-tiny-bpe",
    )


def _config(arch: str, vocab_size: int):
    """A config of the smallest sensible size for ``arch`` (2 layers, width 64, 4 heads)."""
    import transformers as tf

    ids = {"bos_token_id": EOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    decoder = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        **ids,
    )
    head_dim = HIDDEN // HEADS
    if arch == "llama":
        return tf.LlamaConfig(**decoder)
    if arch == "mistral":
        return tf.MistralConfig(**decoder, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**decoder, use_sliding_window=False)
    if arch == "qwen3":
        return tf.Qwen3Config(**decoder, head_dim=head_dim, use_sliding_window=False)
    if arch == "gemma2":
        return tf.Gemma2Config(**decoder, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=128)
    if arch == "opt":
        return tf.OPTConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            ffn_dim=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
            word_embed_proj_dim=HIDDEN,
            **ids,
        )
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab_size,
            n_embd=HIDDEN,
            n_inner=INTERMEDIATE,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=MAX_POSITIONS,
            **ids,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def tiny_model(arch: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised fp32 causal LM of architecture ``arch`` with eager attention.

    The initialisation is seeded without touching the caller's global RNG state. Special token
    ids match :func:`tiny_tokenizer` (eos = bos = 0, pad = 1).
    """
    from transformers import AutoModelForCausalLM

    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    config = _config(arch, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def save_tiny(out_dir: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a tiny model and the tiny tokenizer as a Hugging Face directory and return its path."""
    from elsa.model_io.export import save_checkpoint

    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, len(tokenizer), seed=seed)
    return save_checkpoint(model, tokenizer, out_dir)
