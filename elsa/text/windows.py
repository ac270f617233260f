"""Where BOS goes in the windows a run cuts from text: the window protocol.

Why a module of its own: a model whose tokenizer puts BOS before every text (Gemma, Llama) has
only ever seen text that starts with it. Cutting windows from one tokenisation of a whole text
(the classic SparseGPT/Wanda protocol) leaves BOS in the first window only: Gemma-3-270M's dense
WikiText-2 perplexity is 61.9 that way against 23.1 with BOS per window, and pruning calibrated
or trained on such windows optimises the model for text it never sees in use. ``"bos"`` (the
default) starts every window with it; ``"classic"`` keeps the old protocol for comparisons with
published tables. Tokenizers that add no BOS (SmolLM2) get the same windows either way.
"""

from __future__ import annotations

import torch

from elsa.config import EvalSettings

DEFAULT_WINDOWS = EvalSettings.model_fields["windows"].default
WINDOW_PROTOCOLS = ("bos", "classic")


def leading_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts before plain text, or None where it adds none.

    Asked of the tokenizer itself (it tokenises a short text), not of its config: SmolLM2 names a
    BOS token but never adds it, Gemma and Llama tokenizers add theirs to every call.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", verbose=False)["input_ids"]
    return bos if len(ids) > 0 and ids[0] == bos else None


def window_protocol(tokenizer, windows: str = DEFAULT_WINDOWS) -> str:
    """What a run's windows look like, for records and model cards.

    ``bos-per-window``: every window starts with BOS; ``bos-at-text-start``: the classic protocol
    on a tokenizer that adds BOS (only the text's first window has it); ``no-bos``: the tokenizer
    adds none, so both protocols give the same windows.
    """
    _check_protocol(windows)
    if leading_bos(tokenizer) is None:
        return "no-bos"
    return "bos-per-window" if windows == "bos" else "bos-at-text-start"


def _check_protocol(windows: str) -> None:
    if windows not in WINDOW_PROTOCOLS:
        raise ValueError(f"windows={windows!r} is unknown; choose one of {', '.join(WINDOW_PROTOCOLS)}")


def stream_and_bos(tokenizer, tokens: torch.Tensor, windows: str) -> tuple[torch.Tensor, int | None]:
    """The token stream windows are cut from, and the BOS to put before each (None: none).

    ``bos``: the text's own leading BOS is dropped from the stream and every window gets one;
    windows then hold ``seqlen - 1`` text tokens, so each still predicts ``seqlen - 1`` of them.
    """
    _check_protocol(windows)
    bos = leading_bos(tokenizer) if windows == "bos" else None
    if bos is None:
        return tokens, None
    return (tokens[1:] if tokens.numel() and int(tokens[0]) == bos else tokens), bos


def with_bos(rows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos, dtype=rows.dtype), rows], dim=1)
