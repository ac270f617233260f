"""Shared by the one-shot baselines' tests: calibration ids and a method's config."""

from __future__ import annotations

import torch

from elsa.config import make_config

VOCAB = 256


def calib_ids(n: int = 4, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def method_cfg(method: str, pattern: str = "unstructured", sparsity: float | None = 0.7, **extra):
    sparsity = sparsity if pattern == "unstructured" else None  # N:M implies its own sparsity
    return make_config({"method": method, "pattern": pattern, "sparsity": sparsity, **extra})
