"""Non-uniform sparsity across decoder blocks: OWL's outlier-weighted allocation.

Why: at 70-90% the blocks do not suffer equally. OWL (Yin et al., 2024) observes that blocks
whose Wanda scores |W_ij| * ||X_j|| hold more outliers (scores above ``m`` times the block's mean)
lose more when pruned, and gives each block a density linear in its outlier ratio, rescaled to
span 2 * lam and shifted so that the blocks' mean sparsity is S (the band is centred on the mean
ratio, not on S: SmolLM2-135M at 80%, lam 0.08, spans 0.70-0.86). Every decoder block has the
same matrices, so the overall sparsity of the targets stays S.

The scores come from one dense forward over the one-shot methods' calibration blocks (hooks on
every target layer), before anything is pruned. :func:`resolve_allocation` turns the config's
``allocation: owl`` into a per-matrix sparsity map held in the config itself (levels rounded up
to 4 decimals, so that a recomputation on resume gives the same keep counts); every later builder
of the targets (the one-shot start, ADMM, the export's report) reads that map.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from elsa.methods.wanda import InputNorms, wanda_score
from elsa.targets import Target, config_targets, decoder_blocks, targets_by_block
from elsa.text.data import calibration_blocks

CHUNK = 16  # calibration blocks per forward
ALLOCATION_FILE = "sparsity_map.json"  # beside a one-shot solution in storage: the sparsities it used


class _AllSeen(Exception):
    """Raised once every target layer has its inputs: the rest of the forward is not needed."""


def input_norms(model: nn.Module, targets: list[Target], calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """||X_j||_2 over every calibration token, per target layer, on the dense model.

    Each forward stops at the last target's inputs: what follows (its product, the final norm and
    the output head, a 262k x 640 product per token on Gemma-3-270M) is never needed here."""
    stats: dict[str, InputNorms] = {}
    seen: set[str] = set()
    handles = []
    for target in targets:
        module = model.get_submodule(target.name.rsplit(".", 1)[0])

        def hook(module, inputs, name=target.name):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])
            stats.setdefault(name, InputNorms(x.shape[-1], x.device)).add(x)
            seen.add(name)
            if len(seen) == len(targets):
                raise _AllSeen

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for chunk in calib.split(CHUNK):
                seen.clear()
                with contextlib.suppress(_AllSeen):
                    model(input_ids=chunk)
    finally:
        for handle in handles:
            handle.remove()
    return {name: norms.norms() for name, norms in stats.items()}


def block_outlier_ratios(
    model: nn.Module, targets: list[Target], norms: dict[str, torch.Tensor], m: float
) -> list[float]:
    """Per decoder block: the share of its targets' Wanda scores above ``m`` x the block's mean."""
    prefix, blocks = decoder_blocks(model)
    ratios = []
    for inside in targets_by_block(targets, prefix, len(blocks)):
        flat = torch.cat([wanda_score(t.param, norms[t.name], t.input_dim).reshape(-1) for t in inside])
        ratios.append(float((flat > m * flat.mean()).float().mean()))
    return ratios


def owl_block_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Block sparsities spanning 2 * lam with mean S; more outliers, lower sparsity."""
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    density = (r - r.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(r)
    density = density - density.mean() + (1.0 - sparsity)
    # up to the 4th decimal: the mean stays >= S, and a recomputation gives the same keep counts
    levels = [math.ceil(level * 1e4 - 1e-6) / 1e4 for level in (1.0 - density).tolist()]
    bad = [s for s in levels if not 0.0 <= s < 1.0]
    if bad:
        raise ValueError(
            f"OWL with lambda={lam} at sparsity {sparsity} puts a block at sparsity {bad[0]:.3f}, outside "
            f"[0, 1); use a smaller lambda"
        )
    return levels


def owl_sparsity_map(
    model: nn.Module, targets: list[Target], calib: torch.Tensor, sparsity: float, m: float, lam: float
) -> dict[str, float]:
    """``{weight name: sparsity}`` for every target, from OWL's block allocation."""
    norms = input_norms(model, targets, calib)
    levels = owl_block_sparsities(block_outlier_ratios(model, targets, norms, m), sparsity, lam)
    prefix, blocks = decoder_blocks(model)
    grouped = targets_by_block(targets, prefix, len(blocks))
    return {t.name: level for level, inside in zip(levels, grouped) for t in inside}


def resolve_allocation(model: nn.Module, tokenizer, cfg):
    """``cfg`` with ``allocation: owl`` turned into its sparsity map, computed on ``model`` (which
    must still be dense); any other config unchanged."""
    if cfg.allocation != "owl" or isinstance(cfg.sparsity_map, dict):
        return cfg
    calib = calibration_blocks(tokenizer, cfg.data, cfg.calib_blocks, cfg.seqlen, cfg.seed, windows=cfg.windows)
    smap = owl_sparsity_map(model, config_targets(model, cfg), calib, cfg.sparsity, cfg.owl_m, cfg.owl_lambda)
    return cfg.model_copy(update={"sparsity_map": smap})
