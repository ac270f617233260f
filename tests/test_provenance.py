"""A run's record: versions, machine, text hashes and window protocol, checked against
independent readings (package metadata, the OS, hashlib over the text read another way)."""

from __future__ import annotations

import hashlib
import os

import torch

from elsa import tiny
from elsa.config import make_config
from elsa.model_io.model_card import render_card
from elsa.provenance import run_provenance
from elsa.text.data import load_text
from pipelines.records.compare import format_provenance


def _record(add_bos: bool, **fields):
    cfg = make_config({"sparsity": 0.7, "eval_datasets": ["wikitext2-bundled", "enwiki-sample"], **fields})
    return run_provenance(cfg, tiny.tiny_tokenizer(add_bos=add_bos))


def test_record_matches_independent_readings():
    record = _record(add_bos=True, seqlen=128)
    assert record["version.torch"] == torch.__version__
    assert record["version.lm_eval"] != "absent"  # installed with the pipeline extras
    assert record["machine.cores"] == len(os.sched_getaffinity(0)) and record["machine.gpu_count"] == 0
    assert record["machine.cpu"] and record["machine.gpu"] == "none"
    train = hashlib.sha256(load_text("enwiki-sample", "train").encode()).hexdigest()
    assert record["data_sha256.train"] == train != record["data_sha256.validation"]
    assert record["eval_sha256.enwiki-sample"] == record["data_sha256.validation"]  # its eval split
    assert len(record["eval_sha256.wikitext2-bundled"]) == 64
    assert (record["windows.protocol"], record["windows.seqlen"], record["windows.eval_seqlen"]) == (
        "bos-per-window",
        128,
        512,  # evaluation windows keep their length whatever the training blocks' (elsa/config.py EVAL_SEQLEN)
    )
    assert record["windows.eval_max_windows"] == 32
    every = make_config({"sparsity": 0.7}).model_copy(update={"eval_max_windows": None})
    assert run_provenance(every, tiny.tiny_tokenizer())["windows.eval_max_windows"] == "all"
    assert _record(add_bos=True, windows="classic")["windows.protocol"] == "bos-at-text-start"
    assert _record(add_bos=False)["windows.protocol"] == "no-bos"


def test_missing_text_is_recorded_not_raised():
    record = _record(add_bos=False, data="/nonexistent/calibration.txt")
    assert record["data_sha256.train"].startswith("unavailable")


def test_card_states_the_window_protocol_and_the_record():
    record = _record(add_bos=True)
    metadata = {"config": make_config({"sparsity": 0.7}).model_dump(mode="json"), "provenance": record}
    card = render_card(metadata, None, {"ppl_wikitext2-bundled": 31.5}, {})
    assert "each starting with the tokenizer's BOS" in card
    assert "## Provenance" in card and f"| version.torch | {torch.__version__} |" in card
    assert "## Provenance" not in render_card({"config": metadata["config"]}, None, None, {})


def test_compare_lists_shared_keys_once_and_differing_keys_per_run():
    a, b = _record(add_bos=True), _record(add_bos=True, windows="classic")
    rows = [
        {"run_id": "aaaaaaaa11", "model": "m", "method": "elsa", "sparsity": 0.7, "provenance": a},
        {"run_id": "bbbbbbbb22", "model": "m", "method": "elsa", "sparsity": 0.8, "provenance": b},
    ]
    text = format_provenance(rows)
    assert f"  version.torch: {torch.__version__}" in text
    assert "differs: windows.protocol\n  aaaaaaaa: bos-per-window\n  bbbbbbbb: bos-at-text-start" in text
    assert format_provenance([{"run_id": "x", "provenance": {}}]) == "(no run recorded its provenance)"
