"""Token ids of a text kept on disk, so that a text is tokenised once, not once per process.

Why: a prune reads the same texts in several processes (the preflight's checks, the one-shot
stage, every training worker, the evaluation tasks) and Tune runs it once per trial; tokenising the
bundled enwiki sample alone takes about 2.8 s on the 2-core machine, its validation texts 2 s more.
Each process keeps what it tokenised in memory (:func:`elsa.text.data.source_tokens`); this adds
the disk, shared by all processes and by later runs.

An entry is keyed by the tokenizer (its name, a digest of its full serialisation, and the
transformers / tokenizers versions that turn text into ids) and by the text's own sha256, so an
edited text or another tokenizer never reads stale ids. Stored as safetensors (int64 ids), written
to a temporary file and renamed into place, under ``$ELSA_CACHE/tokens`` (``ELSA_TOKEN_CACHE``
moves it, ``off`` disables it). A failed write only costs the time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Callable

import torch

from elsa.model_io.cache_dirs import cache_dir

CACHE_ENV = "ELSA_TOKEN_CACHE"


def tokenizer_key(tokenizer) -> str:
    """What the tokenizer does, not which object it is; computed once per tokenizer object.

    (Serialising Gemma-3's 262k-token vocabulary takes about 0.4 s, so the digest is remembered.)
    """
    known = getattr(tokenizer, "_elsa_tokenizer_key", None)
    if known is not None:
        return known
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    key = f"{getattr(tokenizer, 'name_or_path', '')}:{hashlib.sha1(blob.encode('utf-8')).hexdigest()[:16]}"
    try:
        tokenizer._elsa_tokenizer_key = key
    except AttributeError:  # a tokenizer class that refuses new attributes: recomputed next time
        pass
    return key


def _versions() -> str:
    import tokenizers
    import transformers

    return f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}"


def stored_tokens(tokenizer, text: str, tokenize: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """``tokenize(text)``, read from the disk cache when this tokenizer has seen this text before."""
    root = cache_dir("tokens", CACHE_ENV)
    if root is None:
        return tokenize(text)
    text_digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    entry = hashlib.sha256(f"{tokenizer_key(tokenizer)}|{_versions()}|{text_digest}".encode()).hexdigest()[:32]
    path = root / f"{entry}.safetensors"
    from safetensors.torch import load_file, save_file

    if path.is_file():
        try:
            return load_file(str(path))["ids"]
        except Exception:  # noqa: BLE001 - a damaged entry is rebuilt, whatever the reader raised
            pass
    tokens = tokenize(text)
    temporary = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, suffix=".tmp", delete=False) as handle:
            temporary = handle.name
        save_file({"ids": tokens.contiguous()}, temporary)
        os.replace(temporary, path)
    except Exception:  # noqa: BLE001 - disk full, read-only home, the writer's own error: only the time is lost
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
    return tokens
