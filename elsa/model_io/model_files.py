"""Checks of a model's files and matrix shapes that need no weights loaded.

Why: a pruning run loads the model inside each Ray worker, minutes after the command started; a
directory without ``config.json``, a truncated safetensors shard or a file named ``.gguf`` that
is not GGUF then fails there as a worker traceback. These checks read only headers and the
config, so the driver can refuse such a model in a second, naming the file and the fix.
The matrix shapes come from a model built on the ``meta`` device (no memory, no weights), which
is what N:M divisibility and sparsity-map names are checked against.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

GGUF_MAGIC = b"GGUF"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors caps its JSON header at 100 MB


class ModelFileError(ValueError):
    """A model's files are missing or unreadable; the message names the file and the fix."""


def check_safetensors(path: Path) -> None:
    """The header parses and every tensor's bytes lie inside the file (catches truncation)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ModelFileError(f"--model: {path} is not a safetensors file ({size} bytes); re-download or re-save it")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER or 8 + length > size:
            raise ModelFileError(
                f"--model: {path} has a corrupt safetensors header (length {length}, file {size} bytes)"
            )
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelFileError(f"--model: {path} has a corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"--model: {path} has a corrupt safetensors header (not a mapping)")
    data_bytes = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = (info or {}).get("data_offsets", [0, 0])[1] if isinstance(info, dict) else None
        if not isinstance(end, int) or end > data_bytes:
            raise ModelFileError(
                f"--model: {path} is truncated or corrupt (tensor {name!r} ends at byte {end}, the file holds "
                f"{data_bytes}); re-download or re-save the model"
            )


def check_gguf(path: Path) -> str:
    """The file starts with the GGUF magic and names an architecture transformers can load."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"--model: {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else None
    except Exception as err:  # noqa: BLE001 - any parse failure means the same: unreadable
        raise ModelFileError(f"--model: {path} is not a readable GGUF file ({type(err).__name__}: {err})") from None
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # an older transformers: let loading decide
        return arch or "unknown"
    if arch is None or arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelFileError(
            f"--model: {path} holds GGUF architecture {arch!r}, which transformers cannot load; supported: "
            f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}"
        )
    return arch


def check_model_dir(directory: Path) -> None:
    """A Hugging Face directory: ``config.json`` and readable weight files."""
    config = directory / "config.json"
    if not config.is_file():
        raise ModelFileError(
            f"--model: directory {directory} has no config.json; give a directory written by save_pretrained"
        )
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"--model: {config} is not valid JSON ({err})") from None
    shards = sorted(directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            wanted = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError):
            raise ModelFileError(f"--model: {index} is not a valid safetensors index") from None
        missing = sorted(name for name in wanted if not (directory / name).is_file())
        if missing:
            raise ModelFileError(f"--model: {directory} lacks shard {missing[0]} named in {index.name}")
    if not shards and not any(directory.glob("*.bin")):
        raise ModelFileError(f"--model: directory {directory} holds no weights (*.safetensors or *.bin)")
    for shard in shards:
        check_safetensors(shard)


def meta_model(path: str, gguf_file: str | None = None, **config_kwargs) -> torch.nn.Module:
    """The model's module tree on the ``meta`` device: real shapes, no weights, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"trust_remote_code": False, **config_kwargs}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    config = AutoConfig.from_pretrained(path, **kwargs)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
