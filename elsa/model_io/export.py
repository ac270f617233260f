"""Saving a (pruned) model as a Hugging Face checkpoint, dense or compressed, and reading it back.

Why: a pruned model is only useful if it can be shipped and opened again. ``dense`` is a plain
``save_pretrained`` directory with safetensors weights that every tool (transformers, lm-eval,
vLLM) opens; ``compressed`` stores each pruned matrix as a packed bitmask plus its non-zeros
(:mod:`elsa.model_io.sparse_format`; SmolLM2-135M in bf16: 0.50 of the dense size at 70%, 0.34 at 90%,
its dense tied embedding being a fifth of the model) and is read by
:func:`load_checkpoint`. Never pickle, which runs code when loaded. An ``elsa_metadata.json``
records how the model was made.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from . import sparse_format
from .models import clear_quantizer, load_model, load_tokenizer, resolve_model

METADATA_FILE = "elsa_metadata.json"
EXPORT_FORMATS = ("dense", "compressed")
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def source_dtype(model_name: str) -> torch.dtype:
    """The dtype a model is published in: config.json's ``dtype``/``torch_dtype``; fp32 if unsaid.

    A GGUF model has no float dtype of its own (it is dequantised from 4-8 bit), so bf16, which
    holds its dequantised values at half the size of fp32.
    """
    source = resolve_model(model_name)
    if source.is_gguf:
        return torch.bfloat16
    if source.kind == "local_dir":
        path = Path(source.path) / "config.json"
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    else:
        from transformers import AutoConfig

        from .models import _hub_kwargs

        config = AutoConfig.from_pretrained(source.path, trust_remote_code=False, **_hub_kwargs(source)).to_dict()
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    found = getattr(torch, str(name).removeprefix("torch."), None)
    return found if isinstance(found, torch.dtype) and found.is_floating_point else torch.float32


def resolve_export(
    model_name: str, export_format: str, export_dtype: str, sparsity: float | None
) -> tuple[str, torch.dtype]:
    """``("dense"|"compressed", dtype)`` for a run's ``export_format`` and ``export_dtype`` settings.

    ``auto`` format: compressed at sparsity >= 0.5 (where bitmask + non-zeros are smaller than the
    matrix), dense otherwise; ``auto`` dtype: :func:`source_dtype`.
    """
    if export_format == "auto":
        export_format = "compressed" if sparsity is not None and sparsity >= 0.5 else "dense"
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export format {export_format!r} is not one of auto, {', '.join(EXPORT_FORMATS)}")
    dtype = source_dtype(model_name) if export_dtype == "auto" else EXPORT_DTYPES[export_dtype]
    return export_format, dtype


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _save_dense(model: torch.nn.Module, out: Path, dtype: torch.dtype) -> None:
    tensors, tied = sparse_format.export_state(model, dtype)  # cast, +0.0 zeros, shared tensors kept shared
    state = dict(tensors)
    for alias, name in tied.items():
        state[alias] = tensors[name]
    # transformers 5 always writes safetensors and dropped the flag; 4.x needs it said explicitly.
    params = inspect.signature(model.save_pretrained).parameters
    kwargs = {"safe_serialization": True} if "safe_serialization" in params else {}
    model.save_pretrained(out, state_dict=state, **kwargs)
    sparse_format.write_config(model, out, dtype)  # say the dtype written, not the model's
    _check_weights(out)


def _check_weights(out: Path) -> None:
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
    export_format: str = "dense",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write model (safetensors), config, tokenizer and optional metadata into ``out_dir``.

    ``export_format``: ``dense`` (a standard Hugging Face checkpoint) or ``compressed``
    (:mod:`elsa.model_io.sparse_format`); ``dtype``: the dtype written (default: the model's). The model's
    own tensors are not cast; -0.0 entries are made +0.0 in place, so both formats hold the same
    bits. Works for models loaded from GGUF (the quantizer is cleared first) and for tiny models.
    ``metadata`` must be JSON-serialisable apart from values that ``str()`` renders well
    (paths, dtypes), which are written as strings.
    """
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export_format {export_format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_quantizer(model)
    dtype = dtype or _model_dtype(model)
    if export_format == "dense":
        _save_dense(model, out, dtype)
    else:
        sparse_format.write_sparse(model, out, dtype)
    tokenizer.save_pretrained(out)
    if metadata is not None:
        text = json.dumps(metadata, indent=2, sort_keys=True, default=str)
        (out / METADATA_FILE).write_text(text + "\n", encoding="utf-8")
    return out


def export_pruned(model: torch.nn.Module, tokenizer, cfg, out_dir: str | Path, report: dict) -> Path:
    """A run's export: format and dtype from ``cfg`` (:func:`resolve_export`), metadata saying both."""
    export_format, dtype = resolve_export(cfg.model, cfg.export_format, cfg.export_dtype, cfg.sparsity)
    from elsa.provenance import run_provenance

    metadata = {
        "config": cfg.model_dump(mode="json"),
        "provenance": run_provenance(cfg, tokenizer),
        "overall_sparsity": report["overall_sparsity"],
        "export_format": export_format,
        "export_dtype": str(dtype).removeprefix("torch."),
    }
    return save_checkpoint(model, tokenizer, out_dir, metadata, export_format=export_format, dtype=dtype)


def read_metadata(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """The metadata written by :func:`save_checkpoint`, or None if there is none."""
    path = Path(checkpoint_dir) / METADATA_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def load_checkpoint(
    checkpoint_dir: str | Path,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
):
    """Read a directory written by :func:`save_checkpoint` (either format); returns ``(model, tokenizer)``.

    ``dtype`` None: the dtype the checkpoint was written in.
    """
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    model = load_model(str(path), dtype=dtype, device=device, attn_implementation=attn_implementation)
    return model, load_tokenizer(str(path))
