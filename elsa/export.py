"""Saving a (pruned) model as a standard Hugging Face checkpoint, and reading it back.

Why: a pruned model is only useful if every downstream tool (lm-eval, vLLM, transformers itself)
can open it, so the output is a plain ``save_pretrained`` directory with safetensors weights —
never pickle, which runs code when loaded — plus an ``elsa_metadata.json`` that records how it
was made.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from .models import clear_quantizer, load_model, load_tokenizer

METADATA_FILE = "elsa_metadata.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _save_weights(model: torch.nn.Module, out: Path) -> None:
    # transformers 5 always writes safetensors and dropped the flag; 4.x needs it said explicitly.
    params = inspect.signature(model.save_pretrained).parameters
    kwargs = {"safe_serialization": True} if "safe_serialization" in params else {}
    model.save_pretrained(out, **kwargs)
    pickled = [p.name for p in out.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickled:
        raise RuntimeError(f"save_pretrained wrote pickle files {pickled} into {out}; refusing")
    if not any(out.glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no .safetensors file into {out}")


def save_checkpoint(
    model: torch.nn.Module,
    tokenizer,
    out_dir: str | Path,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write model (safetensors), config, tokenizer and optional metadata into ``out_dir``.

    Works for models loaded from GGUF (the quantizer is cleared first) and for tiny models.
    ``metadata`` must be JSON-serialisable apart from values that ``str()`` renders well
    (paths, dtypes), which are written as strings.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_quantizer(model)
    _save_weights(model, out)
    tokenizer.save_pretrained(out)
    if metadata is not None:
        text = json.dumps(metadata, indent=2, sort_keys=True, default=str)
        (out / METADATA_FILE).write_text(text + "\n", encoding="utf-8")
    return out


def read_metadata(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """The metadata written by :func:`save_checkpoint`, or None if there is none."""
    path = Path(checkpoint_dir) / METADATA_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def load_checkpoint(
    checkpoint_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
):
    """Read a directory written by :func:`save_checkpoint`; returns ``(model, tokenizer)``."""
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    model = load_model(
        str(path), dtype=dtype, device=device, attn_implementation=attn_implementation
    )
    return model, load_tokenizer(str(path))
