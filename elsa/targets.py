"""Which tensors are pruned: the linear-layer weights inside the transformer blocks.

Found structurally, without per-architecture tables: the decoder blocks are the largest
``nn.ModuleList`` of identical modules (its length equals ``config.num_hidden_layers`` when the
config says), and inside them every ``nn.Linear`` and GPT-2 ``Conv1D`` weight is a target.
Embeddings, norms, biases and ``lm_head`` sit outside the blocks or are not matrices, so they
stay dense (and are still trained by the base optimiser).
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn


@dataclass(frozen=True, eq=False)
class Target:
    """One matrix to prune and its target pattern."""

    name: str  # fully qualified parameter name, e.g. "model.layers.0.mlp.up_proj.weight"
    param: nn.Parameter
    sparsity: float
    nm: tuple[int, int] | None
    input_dim: int  # 1 for nn.Linear (out, in); 0 for Conv1D (in, out)

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def keep(self) -> int:
        return keep_count(self.numel, self.sparsity)


def keep_count(numel: int, sparsity: float) -> int:
    """Survivors of a matrix: ``numel - floor(numel * sparsity)``.

    The 1e-9 guards against binary fractions (0.29 * 100 = 28.999999999999996 in floating
    point); it is far below one entry for any matrix size.
    """
    return numel - math.floor(numel * sparsity + 1e-9)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: (qualified name, ModuleList)."""
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m).__name__ for m in module}) != 1:
            continue
        if expected is not None and len(module) != expected:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(
            f"could not find the transformer blocks of {type(model).__name__}: "
            "no ModuleList of identical modules" + (f" of length {expected}" if expected else "")
        )
    return best


def load_sparsity_map(path: str | Path) -> dict[str, float]:
    """Read a per-matrix sparsity map, ``{name or glob: sparsity}``, from JSON or YAML."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sparsity_map file {str(path)!r} does not exist")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"sparsity_map {str(path)!r} must map weight names (or globs) to sparsities")
    for key, value in data.items():
        if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
            raise ValueError(f"sparsity_map {str(path)!r}: {key!r} has sparsity {value!r}, need 0 <= s < 1")
    return {str(k): float(v) for k, v in data.items()}


def find_targets(
    model: nn.Module,
    sparsity: float | None,
    nm: tuple[int, int] | None = None,
    sparsity_map: dict[str, float] | None = None,
) -> list[Target]:
    """All matrices to prune, in model order, with their sparsity and pattern.

    ``sparsity_map`` entries (exact names or globs, first match wins) override ``sparsity``
    per matrix; a map entry that matches nothing is an error (a typo would silently prune at
    the default). With N:M, every matrix gets 1 - N/M and the map is refused.
    """
    if nm is not None and sparsity_map:
        raise ValueError("a sparsity_map cannot be combined with an N:M pattern (N:M fixes the sparsity)")
    prefix, blocks = decoder_blocks(model)
    targets: list[Target] = []
    used: set[str] = set()
    for block_index, block in enumerate(blocks):
        for sub_name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                input_dim = 1
            elif _is_conv1d(module):
                input_dim = 0
            else:
                continue
            name = f"{prefix}.{block_index}.{sub_name}.weight"
            level = sparsity
            for pattern, value in (sparsity_map or {}).items():
                if pattern == name or fnmatch.fnmatchcase(name, pattern):
                    level, _ = value, used.add(pattern)
                    break
            if nm is not None:
                level = 1.0 - nm[0] / nm[1]
                rows, cols = (module.weight.shape[0], module.weight.shape[1])
                fan_in = cols if input_dim == 1 else rows
                if fan_in % nm[1]:
                    raise ValueError(
                        f"{name}: input dimension {fan_in} is not a multiple of M={nm[1]} for {nm[0]}:{nm[1]}"
                    )
            if level is None:
                raise ValueError(f"{name}: no sparsity given and no sparsity_map entry matches it")
            targets.append(Target(name, module.weight, float(level), nm, input_dim))
    unused = set(sparsity_map or {}) - used
    if unused:
        raise ValueError(f"sparsity_map entries match no prunable matrix: {sorted(unused)}")
    if not targets:
        raise ValueError(f"no linear layers found inside the blocks at {prefix!r}")
    return targets


def targets_by_block(targets: list[Target], prefix: str, n_blocks: int) -> list[list[Target]]:
    """``targets`` grouped by the decoder block (``{prefix}.{index}.``) that holds them."""
    grouped: list[list[Target]] = [[] for _ in range(n_blocks)]
    for target in targets:
        index = int(target.name[len(prefix) + 1 :].split(".", 1)[0])
        grouped[index].append(target)
    return grouped


def config_targets(model: nn.Module, cfg) -> list[Target]:
    """The matrices ``cfg`` prunes (uniform sparsity, N:M, or its per-matrix sparsity map: a file,
    or a dict resolved from ``allocation: owl``): the one builder every method and the ADMM loop use."""
    sparsity_map = load_sparsity_map(cfg.sparsity_map) if isinstance(cfg.sparsity_map, str) else cfg.sparsity_map
    return find_targets(model, cfg.sparsity, cfg.nm, sparsity_map)


def sparsity_report(targets: list[Target], weights: dict[str, torch.Tensor] | None = None) -> dict:
    """Per-matrix zero counts against their targets, and the overall sparsity of the targets.

    ``weights`` (name -> full tensor) replaces the live parameters, e.g. a gathered state dict
    on one rank; without it a sharded parameter is gathered (a collective: call on all ranks).
    """
    rows = []
    zeros_total = numel_total = 0
    for target in targets:
        weight = weights[target.name] if weights is not None else target.param.detach()
        weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
        zeros = int((weight == 0).sum())
        expected_zeros = target.numel - target.keep
        row = {
            "name": target.name,
            "shape": list(target.shape),
            "numel": target.numel,
            "zeros": zeros,
            "sparsity": zeros / target.numel,
            "target_sparsity": target.sparsity,
            "expected_zeros": expected_zeros,
            "ok": zeros >= expected_zeros,
        }
        if target.nm is not None:
            row["nm_ok"] = bool(nm_satisfied(weight, *target.nm, input_dim=target.input_dim))
            row["ok"] = row["ok"] and row["nm_ok"]
        rows.append(row)
        zeros_total += zeros
        numel_total += target.numel
    return {
        "matrices": rows,
        "overall_sparsity": zeros_total / max(numel_total, 1),
        "all_ok": all(r["ok"] for r in rows),
    }


def nm_satisfied(weight: torch.Tensor, n: int, m: int, input_dim: int = 1) -> bool:
    """True when every group of m consecutive inputs holds at most n non-zeros."""
    w = weight if input_dim == 1 else weight.t()
    groups = (w != 0).reshape(w.shape[0], -1, m).sum(dim=-1)
    return bool((groups <= n).all())


class SparsityError(RuntimeError):
    """A pruned model misses its target sparsity in at least one matrix."""


def verify_sparsity(targets: list[Target]) -> dict:
    """The sparsity report, raising :class:`SparsityError` if any matrix misses its target."""
    report = sparsity_report(targets)
    bad = [r for r in report["matrices"] if not r["ok"]]
    if bad:
        worst = bad[0]
        raise SparsityError(
            f"{len(bad)} matrices miss their target sparsity, e.g. {worst['name']}: "
            f"{worst['zeros']} zeros, expected >= {worst['expected_zeros']}"
        )
    return report
