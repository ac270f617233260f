"""Local text files and directories as data sources: what ``--data PATH`` reads.

Why apart from :mod:`elsa.text.data`: the formats (plain text, JSON lines, parquet/arrow, a
``datasets.save_to_disk`` directory, a directory of such files with split names) are a job of
their own; ``elsa.text.data`` only asks for the rows of a path and split.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

_TEXT_SUFFIXES = (".txt", ".raw")
_JSON_SUFFIXES = (".jsonl", ".json")
_LOCAL_SUFFIXES = _TEXT_SUFFIXES + _JSON_SUFFIXES + (".parquet", ".arrow")
_KNOWN_SPLITS = ("train", "validation", "valid", "val", "test")


class DataNotAvailableError(ValueError):
    """A data source cannot be read here (hub out of reach and no cached copy, or missing file)."""


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _base_suffix(path: Path) -> str:
    """``.jsonl`` for ``x.jsonl.gz`` as for ``x.jsonl``."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1].lower() if suffixes else ""


def _text_field(record, path: Path) -> str:
    if not isinstance(record, dict) or "text" not in record:
        raise ValueError(f"{path}: every record must be an object with a 'text' field")
    return str(record["text"])


def _json_rows(path: Path) -> list[str]:
    with _open_text(path) as handle:
        content = handle.read()
    try:
        whole = json.loads(content)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        return [_text_field(r, path) for r in whole]
    if isinstance(whole, dict) and isinstance(whole.get("text"), list):
        return [str(t) for t in whole["text"]]
    if isinstance(whole, dict):
        return [_text_field(whole, path)]
    return [_text_field(json.loads(line), path) for line in content.splitlines() if line.strip()]


def _table_rows(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    else:  # .arrow as written by datasets (an IPC stream)
        import pyarrow as pa

        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
    if "text" not in table.column_names:
        raise ValueError(f"{path} has no 'text' column (columns: {', '.join(table.column_names)})")
    return [str(t) for t in table.column("text").to_pylist()]


def _file_rows(path: Path) -> list[str]:
    suffix = _base_suffix(path)
    if suffix in _TEXT_SUFFIXES:
        with _open_text(path) as handle:
            return [handle.read()]
    if suffix in _JSON_SUFFIXES:
        return _json_rows(path)
    if suffix in (".parquet", ".arrow"):
        return _table_rows(path)
    raise ValueError(
        f"unsupported data file {str(path)!r}; use .txt/.raw, .jsonl/.json (with a 'text' field, "
        "optionally .gz), .parquet or a datasets.save_to_disk directory"
    )


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _saved_dataset_rows(path: Path, split: str | None) -> list[str]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            split = next(iter(loaded)) if len(loaded) == 1 else None
        if split not in loaded:
            raise ValueError(f"{path} holds splits {', '.join(loaded)}; split {split!r} is not among them")
        loaded = loaded[split]
    if "text" not in loaded.column_names:
        raise ValueError(f"{path} has no 'text' column (columns: {', '.join(loaded.column_names)})")
    return [str(t) for t in loaded["text"]]


def _split_of(path: Path, root: Path) -> str | None:
    """The split a file's relative path names (``test-00000.parquet`` -> ``test``), if any."""
    words = re.split(r"[^a-z]+", str(path.relative_to(root)).lower())
    found = [s for s in _KNOWN_SPLITS if s in words]
    aliases = {"valid": "validation", "val": "validation"}
    return aliases.get(found[0], found[0]) if found else None


def _directory_rows(path: Path, split: str | None) -> list[str]:
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and _base_suffix(p) in _LOCAL_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataNotAvailableError(f"directory {str(path)!r} holds no readable data files")
    by_split = {p: _split_of(p, path) for p in files}
    named = {s for s in by_split.values() if s}
    if not named:
        return holdout_split([row for p in files for row in _file_rows(p)], split)
    if named:
        if split is None or split not in named:
            raise ValueError(
                f"directory {str(path)!r} holds splits {', '.join(sorted(named))}; "
                f"choose one of them (got split {split!r})"
            )
        files = [p for p in files if by_split[p] == split]
    return [row for p in files for row in _file_rows(p)]


HOLDOUT_FRACTION = 0.1


def holdout_split(rows: list[str], split: str | None) -> list[str]:
    """Train/validation cut of a source that names no splits: the last 10% is validation.

    So the projected validation loss that Tune optimises is never measured on the very text
    being trained on. Many rows are cut by row; one long text at a line break near 90%.
    Any other split (``test``, None) gets everything.
    """
    if split not in ("train", "validation"):
        return rows
    if len(rows) >= 10:
        cut = len(rows) - max(1, int(len(rows) * HOLDOUT_FRACTION))
        return rows[:cut] if split == "train" else rows[cut:]
    text = "\n\n".join(rows)
    target = int(len(text) * (1 - HOLDOUT_FRACTION))
    cut = text.rfind("\n", 0, target)
    cut = target if cut <= 0 else cut
    return [text[:cut]] if split == "train" else [text[cut:]]


def local_rows(path: Path, split: str | None) -> list[str]:
    """The text rows of a local file or directory (for a split-less source, ``holdout_split``)."""
    if path.is_dir():
        if _is_saved_dataset(path):
            return _saved_dataset_rows(path, split)
        return _directory_rows(path, split)
    return holdout_split(_file_rows(path), split)


def looks_like_path(source: str) -> bool:
    """Whether ``source`` was meant as a path (so a missing one is reported as a missing file)."""
    return (
        Path(source).expanduser().exists()
        or "/" in source
        or "\\" in source
        or (_base_suffix(Path(source)) in _LOCAL_SUFFIXES)
    )
