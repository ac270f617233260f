"""Wanda (Sun et al., 2023): prune by |W_ij| * ||X_j||_2, compared within each output row.

Why the input norm: a weight's contribution to the layer output scales with the size of the input
it multiplies, so a small weight on a loud feature can matter more than a large one on a quiet
feature. ``||X_j||_2`` is the norm of input feature j over every calibration token, measured on
the inputs the layer sees after the earlier blocks were pruned (the sequential pass of
:mod:`elsa.methods.layerwise`). No weight is updated: Wanda only chooses a mask.

Comparison group: unstructured masks compare within each output row, as the paper does (its
ablation finds per-row better than per-matrix for LLMs). The rows keep near-equal shares that sum
exactly to the matrix's ``keep`` (:func:`row_keep_counts`), so the per-matrix sparsity contract
holds; ``per_row: false`` (``--wanda-per-row``) compares over the whole matrix instead. N:M compares within each group.
"""

from __future__ import annotations

import torch

from elsa.methods import register
from elsa.methods.layerwise import LayerwiseMethod, apply_mask, in_features, rows_view, score_mask, spread
from elsa.methods.settings import WandaSettings
from elsa.targets import Target


class InputNorms:
    """Sum over calibration tokens of each input feature squared (fp32)."""

    def __init__(self, in_features: int, device: torch.device):
        self.sq = torch.zeros(in_features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        self.sq += x.float().pow(2).sum(dim=0)

    def norms(self) -> torch.Tensor:
        return self.sq.sqrt()


def row_keep_counts(target: Target) -> list[int]:
    """Survivors per output row: near-equal, summing exactly to ``target.keep``."""
    rows = rows_view(target.param, target).shape[0]
    return spread(target.keep, rows)


def per_row_mask(score: torch.Tensor, keeps: list[int]) -> torch.Tensor:
    """Keep the ``keeps[i]`` largest scores of row i of ``score`` (rows, cols); lower index wins ties."""
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    keep = torch.tensor(keeps, device=score.device)
    ranked = torch.arange(score.shape[1], device=score.device)[None, :] < keep[:, None]
    mask = torch.zeros_like(score, dtype=torch.bool)
    return mask.scatter_(1, order, ranked)


def wanda_score(weight: torch.Tensor, norms: torch.Tensor, input_dim: int) -> torch.Tensor:
    """|W| * ||X_j|| in the weight's own layout (input features along ``input_dim``)."""
    scale = norms[None, :] if input_dim == 1 else norms[:, None]
    return weight.detach().float().abs() * scale


def wanda_mask(target: Target, norms: torch.Tensor, per_row: bool = True) -> torch.Tensor:
    """The keep mask of one matrix, in the weight's own layout."""
    score = wanda_score(target.param, norms, target.input_dim)
    if target.nm is not None or not per_row:
        return score_mask(score, target)
    rows_mask = per_row_mask(rows_view(score, target), row_keep_counts(target))
    return rows_view(rows_mask, target)


@register("wanda")
class Wanda(LayerwiseMethod):
    Settings = WandaSettings

    def stats(self, target: Target) -> InputNorms:
        return InputNorms(in_features(target), target.param.device)

    def prune(self, target: Target, stats: InputNorms) -> None:
        apply_mask(target, wanda_mask(target, stats.norms(), self.settings.per_row))
