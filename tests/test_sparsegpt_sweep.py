"""SparseGPT's fast paths against plain computations: the transposed, lazily batched column sweep
against a textbook OBS loop, the upper-triangle Hessian against the full product."""

from __future__ import annotations

import pytest
import torch

from elsa.methods.sparsegpt import InputHessian, inverse_hessian_factor, sparsegpt_prune


def _plain_obs(weight: torch.Tensor, hessian: torch.Tensor, keep: int, blocksize: int, damp: float = 0.01):
    """Column by column on the (out, in) layout, every update applied at once (no lazy batching);
    each block of columns prunes its share by saliency w^2 / U_ii^2 of the weights as updated so
    far, ties to the lower row-major index (a stable sort)."""
    w = weight.double().clone()
    u = inverse_hessian_factor(hessian, damp).double()
    rows, cols = w.shape
    pruned_total = rows * cols - keep
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        saliency = (w[:, i1:i2].pow(2) / u.diagonal()[i1:i2].pow(2)).float()
        share = pruned_total * i2 // cols - pruned_total * i1 // cols
        order = torch.argsort(-saliency.flatten(), stable=True)
        block_mask = torch.zeros(saliency.numel(), dtype=torch.bool)
        block_mask[order[: saliency.numel() - share]] = True
        mask[:, i1:i2] = block_mask.view(saliency.shape)
        for i in range(i1, i2):
            err = w[:, i] * (~mask[:, i]) / u[i, i]
            w[:, i:] -= torch.outer(err, u[i, i:])
    return w * mask, mask


def _quantised(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Weights on a coarse grid, as dequantised GGUF weights are: many exactly equal entries."""
    return (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 4).round() / 4


@pytest.mark.parametrize(
    "rows,cols,blocksize,correlated", [(48, 64, 16, True), (20, 96, 32, True), (33, 50, 16, True), (24, 64, 32, False)]
)
def test_sweep_equals_a_plain_obs_loop_ties_included(rows, cols, blocksize, correlated):
    """Uncorrelated inputs (H = 2I): every column has the same U_ii, so equal weights in different
    columns tie, and the order ties break in decides the mask."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(512, cols, generator=gen) @ torch.randn(cols, cols, generator=gen) * 0.2
    hessian = 2 * x.t() @ x / x.shape[0] if correlated else 2 * torch.eye(cols)
    weight = _quantised(rows, cols, seed=cols)
    keep = int(weight.numel() * 0.3)
    new, mask = sparsegpt_prune(weight, hessian, keep, blocksize=blocksize)
    expected, expected_mask = _plain_obs(weight, hessian, keep, blocksize)
    assert torch.equal(mask, expected_mask)
    assert int(mask.sum()) == keep
    assert torch.allclose(new.double(), expected, atol=1e-4, rtol=1e-4)


def test_sweep_leaves_a_transposed_weight_untouched():
    """A Conv1D weight reaches the sweep as a transposed view of the parameter: it must be copied."""
    param = torch.randn(32, 16)  # stored (in, out), as GPT-2's Conv1D does
    before = param.clone()
    x = torch.randn(256, 32)
    new, mask = sparsegpt_prune(param.t(), 2 * x.t() @ x / 256, keep=200)
    assert torch.equal(param, before)
    assert new.shape == (16, 32) and int(mask.sum()) == 200


@pytest.mark.parametrize("features,parts", [(40, 4), (3, 4), (17, 1), (17, 5)])
def test_hessian_from_its_upper_triangle_equals_the_full_product(features, parts):
    gen = torch.Generator().manual_seed(features)
    chunks = [torch.randn(70, features, generator=gen) for _ in range(3)]
    acc = InputHessian(features, torch.device("cpu"), parts=parts)
    for chunk in chunks:
        acc.add(chunk)
    x = torch.cat(chunks).double()
    expected = 2 * x.t() @ x / x.shape[0]
    got = acc.matrix()
    assert torch.equal(got, got.t())
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)
