"""A dequantised copy of a GGUF model on disk, so that only the first load runs the GGUF reader.

Why: transformers reads a GGUF file by parsing its metadata in Python (SmolLM2's 49k-token
vocabulary twice, once for the config and once for the weights) and dequantising every tensor:
14 s for SmolLM2-135M here, and 3 s more for its tokenizer. A prune loads the model in every
process that needs it (the one-shot start, each training worker), so the demo paid that several
times. Saved once as safetensors in fp32 (the dequantised values exactly) with the tokenizer's
own files, the model loads in about a second.

Layout: ``<root>/<gguf stem>-<key>/{model,tokenizer}/``, ``key`` a digest of the GGUF file's
absolute path, size and modification time and of the transformers version whose reader made the
copy (another version may map or dequantise differently). Each part is written to a temporary
directory and renamed into place, so processes loading at once never read a half-written copy;
a failed write (disk full, read-only home) only costs the speed. ``ELSA_DEQUANTIZED_CACHE`` sets
the root (default ``$ELSA_CACHE/dequantized``, :mod:`elsa.model_io.cache_dirs`); ``off`` disables it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

from .cache_dirs import cache_dir

CACHE_ENV = "ELSA_DEQUANTIZED_CACHE"


def cache_root() -> Path | None:
    """Where copies live, or None when the cache is switched off."""
    return cache_dir("dequantized", CACHE_ENV)


def _part_dir(gguf: Path, part: str) -> Path | None:
    root = cache_root()
    if root is None:
        return None
    import transformers

    stat = gguf.stat()
    identity = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|transformers {transformers.__version__}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return root / f"{gguf.stem}-{key}" / part


def cached(gguf: Path, part: str) -> Path | None:
    """The saved ``part`` ("model" or "tokenizer") of ``gguf``, if a complete copy exists."""
    where = _part_dir(gguf, part)
    return where if where is not None and where.is_dir() else None


def store(gguf: Path, part: str, save: Callable[[Path], None]) -> Path | None:
    """Write ``part`` of ``gguf`` with ``save(directory)``, then rename it into place."""
    where = _part_dir(gguf, part)
    if where is None or where.is_dir():
        return where
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=where.parent))
        try:
            save(scratch)
            (scratch / "elsa_source.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "part": part}))
            os.rename(scratch, where)
        except OSError:
            if not where.is_dir():  # another process's rename wins the race: not an error
                raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    except OSError as err:
        warnings.warn(
            f"could not keep a dequantised copy of {gguf.name} in {where.parent} ({err}); "
            "later loads re-read the GGUF file"
        )
        return None
    return where
