"""ELSA's compressed sparse checkpoint: a packed bitmask plus the non-zeros per pruned matrix.

Why a format of our own: a 70-90% sparse model saved densely is as large as the dense model.
compressed-tensors' sparse-bitmask format was the obvious choice, but current releases dropped
sparse compression and no tested transformers version ``from_pretrained``s such a checkpoint, so
this project writes and reads its own layout (the one :mod:`elsa.optim.states` uses for a sparse z).

Layout of a compressed export directory (everything else as in a Hugging Face checkpoint):

``model.sparse.safetensors`` (one safetensors file; no pickle) holds, for every tensor ``W`` of
the model's state dict (tied duplicates written once):

* a *compressed* matrix (a floating tensor with ndim >= 2 and at least half of its entries zero)
  as two tensors:

  - ``W.bitmask``: uint8, ``ceil(numel / 8)`` bytes; bit ``i % 8`` (least significant first) of
    byte ``i // 8`` is 1 when entry ``i`` of ``W`` flattened in row-major (C) order is non-zero;
  - ``W.values``: the non-zero entries in that same row-major order, 1-D, in the export dtype;

* any other tensor ``W`` unchanged under its own name.

``config.json`` is the model's Hugging Face config with one extra block::

    "elsa_sparse": {"format": "elsa-bitmask", "version": 1, "weights": "model.sparse.safetensors",
                    "dtype": "bfloat16", "shapes": {"W": [rows, cols], ...},
                    "tied": {"lm_head.weight": "model.embed_tokens.weight", ...}}

``shapes`` lists the compressed matrices, ``tied`` the state-dict names that share the tensor
of another name and are not stored. Densifying sets ``W.view(-1)[bits] = values`` into zeros of
``shape``. Zeros are stored as +0.0 (an exported matrix never holds -0.0, dense or compressed), so
the densified weights equal the dense export bit for bit.

Only :func:`load_sparse_model` (and so ``elsa.model_io.export.load_checkpoint``, ``elsa eval`` and the
evaluation tasks) reads this format; other tools need the densified model (see the README).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

from elsa.optim.states import pack_mask

from .quiet import no_progress_bars

FORMAT_NAME = "elsa-bitmask"
FORMAT_VERSION = 1
CONFIG_KEY = "elsa_sparse"
WEIGHTS_FILE = "model.sparse.safetensors"
MIN_ZERO_FRACTION = 0.5


def is_sparse_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a compressed export (its config.json has the block)."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        return False
    return CONFIG_KEY in json.loads(config.read_text(encoding="utf-8"))


def compressible(tensor: torch.Tensor) -> bool:
    """A floating matrix with at least half its entries zero: bitmask + values are smaller."""
    if tensor.ndim < 2 or not tensor.is_floating_point() or tensor.numel() == 0:
        return False
    return int((tensor == 0).sum()) >= MIN_ZERO_FRACTION * tensor.numel()


def canonical_zeros_(tensor: torch.Tensor) -> torch.Tensor:
    """Turn -0.0 into +0.0 in place (a mask multiply leaves -0.0 where negatives were pruned)."""
    if tensor.is_floating_point():
        tensor.masked_fill_(tensor == 0, 0.0)
    return tensor


def export_state(model: torch.nn.Module, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict cast to ``dtype`` (floating tensors only), each shared tensor once.

    Returns ``(tensors, tied)``: ``tied`` maps a left-out name to the name holding its tensor.
    Zeros are made +0.0 in place in the model first, so every export format stores the same bits.
    """
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        canonical_zeros_(tensor)
        cast = tensor.detach().to("cpu")
        if cast.is_floating_point():
            cast = cast.to(dtype)
        tensors[name] = cast.contiguous()
    return tensors, tied


def compress(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Split every compressible tensor into ``.bitmask`` and ``.values``; returns (tensors, shapes)."""
    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, tensor in tensors.items():
        if not compressible(tensor):
            out[name] = tensor
            continue
        flat = tensor.reshape(-1)
        mask = flat != 0
        out[f"{name}.bitmask"] = pack_mask(mask)
        out[f"{name}.values"] = flat[mask].contiguous()
        shapes[name] = list(tensor.shape)
    return out, shapes


_BIT_VALUES = (1, 2, 4, 8, 16, 32, 64, 128)


def _unpack(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """The layout of :func:`elsa.optim.states.unpack_mask` (LSB first), with one pass fewer: AND, compare."""
    weights = torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(1) & weights) != 0).view(-1)[:numel]


def decompress(stored: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`compress`: dense tensors by name."""
    dense = {name: t for name, t in stored.items() if not name.endswith((".bitmask", ".values"))}
    for name, shape in shapes.items():
        values = stored[f"{name}.values"]
        numel = math.prod(shape)
        mask = _unpack(stored[f"{name}.bitmask"], numel)
        kept = int(mask.sum())
        if kept != values.numel():
            raise ValueError(
                f"compressed checkpoint is corrupt: {name} has {kept} mask bits but {values.numel()} values"
            )
        dense[name] = torch.zeros(numel, dtype=values.dtype).masked_scatter_(mask, values).view(shape)
    return dense


def write_sparse(model: torch.nn.Module, out: Path, dtype: torch.dtype) -> dict:
    """Write ``model.sparse.safetensors``, config.json (with the block) and generation_config.json.

    Returns the ``elsa_sparse`` block.
    """
    from safetensors.torch import save_file

    tensors, tied = export_state(model, dtype)
    stored, shapes = compress(tensors)
    save_file(stored, str(out / WEIGHTS_FILE), metadata={"format": "pt", "elsa_sparse": FORMAT_NAME})
    block = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "weights": WEIGHTS_FILE,
        "dtype": str(dtype).removeprefix("torch."),
        "shapes": shapes,
        "tied": tied,
    }
    write_config(model, out, dtype, block)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(out)
    return block


def write_config(model: torch.nn.Module, out: Path, dtype: torch.dtype, block: dict | None = None) -> None:
    """config.json of ``model`` saying ``dtype`` (and holding ``block`` when given)."""
    config = copy.deepcopy(model.config)
    name = str(dtype).removeprefix("torch.")
    setattr(config, "dtype" if "dtype" in vars(config) or not hasattr(config, "torch_dtype") else "torch_dtype", name)
    if block is not None:
        setattr(config, CONFIG_KEY, block)
    elif hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    config.save_pretrained(out)
    if block is None:
        return
    data = json.loads((out / "config.json").read_text(encoding="utf-8"))
    data[CONFIG_KEY] = block  # written explicitly: some config classes drop unknown attributes
    data["dtype"] = name
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_sparse_model(
    directory: str | Path, dtype: torch.dtype | None = torch.float32, attn_implementation: str | None = None
) -> torch.nn.Module:
    """Build the model from config.json and fill it with the densified weights.

    ``dtype`` None keeps the stored dtype. The returned model's config no longer carries the
    block, so ``save_pretrained`` on it writes an ordinary dense checkpoint.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    directory = Path(directory)
    block = json.loads((directory / "config.json").read_text(encoding="utf-8"))[CONFIG_KEY]
    if block.get("format") != FORMAT_NAME or int(block.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{directory}: sparse format {block.get('format')!r} version {block.get('version')} "
            f"is not {FORMAT_NAME!r} <= {FORMAT_VERSION}; upgrade this package"
        )
    dtype = dtype or getattr(torch, block["dtype"])
    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    state = decompress(load_file(str(directory / block["weights"])), block["shapes"])
    for alias, source in block.get("tied", {}).items():
        state[alias] = state[source]
    kwargs: dict = {"config": config, "state_dict": state, "dtype": dtype, "output_loading_info": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    # transformers builds the model without initialising it, fills it from ``state`` (ties and
    # non-persistent buffers such as rotary frequencies handled as for any checkpoint)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the Auto class wants a path, not a state dict
    with no_progress_bars():  # its "Loading weights" bar would count tensors already in memory
        model, info = model_class.from_pretrained(None, **kwargs)
    if info.get("missing_keys") or info.get("unexpected_keys") or info.get("mismatched_keys"):
        raise ValueError(
            f"{directory}: weights do not fit the config: "
            f"missing {sorted(info.get('missing_keys', []))[:3]}, "
            f"unexpected {sorted(info.get('unexpected_keys', []))[:3]}, "
            f"mismatched {list(info.get('mismatched_keys', []))[:3]}"
        )
    return model.eval()
