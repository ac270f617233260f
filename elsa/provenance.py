"""What a number depends on besides the config: package versions, the exact texts, the window
protocol and the machine.

Why: a perplexity moves with the evaluation text (a hub copy against the bundled rows), with where
BOS goes (2.5x on Gemma-3-270M's dense model), with the library versions and, in the last digits,
with the machine. A run records all of it beside its config, so two runs are comparable only when
these agree, and anybody can see when they do not. Cheap to compute: versions are read from package
metadata (nothing is imported), texts are hashed once per process.
"""

from __future__ import annotations

import hashlib
import os
import platform
from functools import lru_cache
from importlib import metadata

# the packages whose versions decide a run's numbers (lm-eval: zero-shot scores)
PACKAGES = ("torch", "transformers", "ray", "mlflow", "lm_eval")
_DISTRIBUTIONS = {"lm_eval": "lm-eval"}


def package_versions() -> dict[str, str]:
    """``{package: version}``, ``"absent"`` for a package not installed (ray on a bare GPU box)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(_DISTRIBUTIONS.get(name, name))
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    """CPU model and usable cores, GPU name and count (``none``/0 without one)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "cpu": _cpu_model(),
        "cores": cores,
        "gpu": torch.cuda.get_device_name(0) if gpus else "none",
        "gpu_count": gpus,
    }


@lru_cache(maxsize=16)
def text_sha256(source: str, split: str | None) -> str:
    """SHA-256 of the text a run reads from ``source``/``split`` (``unavailable`` if it cannot be had).

    The same function that feeds the windows reads the text, so the hash is of exactly what was
    tokenised (for the bundled WikiText-2: its rows joined by blank lines, not the raw file).
    """
    from elsa.text.data import load_text

    try:
        return hashlib.sha256(load_text(source, split).encode("utf-8")).hexdigest()
    except (OSError, ValueError) as err:  # DataNotAvailableError is a ValueError
        return f"unavailable ({type(err).__name__})"


def run_provenance(cfg, tokenizer) -> dict[str, object]:
    """The record of one run, flat (``group.key``) so it goes as it is into MLflow tags and a card.

    ``data_sha256.<split>``: the calibration text's train and validation splits;
    ``eval_sha256.<dataset>``: each perplexity dataset's evaluation split; ``windows.*``: the
    protocol as resolved for this tokenizer (:func:`elsa.text.data.window_protocol`).
    """
    from elsa.text.data import default_split, window_protocol

    record: dict[str, object] = {f"version.{k}": v for k, v in package_versions().items()}
    record.update({f"machine.{k}": v for k, v in machine().items()})
    for split in ("train", "validation"):
        record[f"data_sha256.{split}"] = text_sha256(cfg.data, split)
    for name in cfg.eval_datasets:
        record[f"eval_sha256.{name}"] = text_sha256(name, default_split(name))
    record["windows.protocol"] = window_protocol(tokenizer, cfg.windows)
    record["windows.seqlen"] = cfg.seqlen
    record["windows.eval_seqlen"] = cfg.eval_seqlen or cfg.seqlen
    record["windows.eval_max_windows"] = cfg.eval_max_windows if cfg.eval_max_windows is not None else "all"
    return record
