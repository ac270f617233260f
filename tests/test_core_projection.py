"""Projections against brute-force references: exact top-k with deterministic ties, the same mask
when the matrix is row-sharded over two real processes (gloo), N:M, and the objective-aware score."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from core_settings import admm_settings
from elsa.optim.admm import ADMM, PenaltySchedule
from elsa.optim.projection import fisher_score, magnitude_score, nm_mask, project_mask, topk_mask
from elsa.targets import Target


# ---------------------------------------------------------------- brute-force references


def ref_topk(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep the ``keep`` entries first in the order (-score, flat index)."""
    flat = score.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[order[:keep]] = True
    return mask.view(score.shape)


def ref_nm(score: torch.Tensor, n: int, m: int, input_dim: int) -> torch.Tensor:
    """Per row (output unit), per group of m consecutive inputs, keep the n first in (-score, index)."""
    s = score if input_dim == 1 else score.t()
    mask = torch.zeros(s.shape, dtype=torch.bool)
    rows, cols = s.shape
    for r in range(rows):
        for g in range(0, cols, m):
            vals = s[r, g : g + m].tolist()
            order = sorted(range(m), key=lambda i: (-vals[i], i))
            for i in order[:n]:
                mask[r, g + i] = True
    return mask if input_dim == 1 else mask.t()


def tied_scores(shape, levels: int, seed: int) -> torch.Tensor:
    """Scores with many ties: a handful of distinct values, some of them 0 and subnormal."""
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([0.0, 1e-40, 0.5, 1.0, 1.0 + 2**-23, 3.0, 7.25, 1e30])[:levels]
    return values[torch.randint(0, len(values), shape, generator=g)]


# ---------------------------------------------------------------- single process


@pytest.mark.parametrize("shape,levels,seed", [((13, 17), 3, 0), ((16, 16), 8, 1), ((1, 50), 2, 2), ((40, 7), 5, 3)])
def test_topk_matches_brute_force_with_ties(shape, levels, seed):
    score = tied_scores(shape, levels, seed)
    total = score.numel()
    keeps = sorted(
        {0, 1, 2, total // 3, total // 2, total - 1, total}
        | {int(k) for k in torch.randint(0, total + 1, (6,), generator=torch.Generator().manual_seed(seed))}
    )
    for keep in keeps:
        mask = topk_mask(score, keep)
        assert mask.dtype == torch.bool and mask.shape == score.shape
        assert int(mask.sum()) == keep, f"keep={keep}"
        assert torch.equal(mask, ref_topk(score, keep)), f"keep={keep}"


@pytest.mark.parametrize("shape,levels,seed", [((13, 17), 3, 0), ((40, 7), 5, 3), ((64, 33), 8, 4)])
def test_accelerator_topk_path_matches_brute_force(shape, levels, seed):
    """The selection accelerators take (top-k threshold + running tie count), run here on the CPU."""
    from elsa.optim.projection import _as_bits, _device_topk_mask

    score = tied_scores(shape, levels, seed)
    for keep in range(1, score.numel() + 1, max(1, score.numel() // 17)):
        mask = _device_topk_mask(_as_bits(score), keep).view(score.shape)
        assert torch.equal(mask, ref_topk(score, keep)), f"keep={keep}"


def test_topk_continuous_scores_and_negative_zero():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 33, generator=g)
    x[0, :5] = -0.0  # magnitude of -0.0 must order as 0
    x[1, :5] = 0.0
    score = magnitude_score(x)
    for keep in (0, 1, 100, 1000, score.numel() - 3, score.numel()):
        assert torch.equal(topk_mask(score, keep), ref_topk(score, keep))
    with pytest.raises(ValueError):
        topk_mask(score, score.numel() + 1)
    with pytest.raises(ValueError, match="NaN"):
        topk_mask(torch.tensor([1.0, float("nan")]), 1)


def test_both_digit_schedules_find_the_same_threshold_where_scores_share_their_top_bits():
    """One process reads the top 15 bits at once, shards four bytes: same threshold, tie count and
    mask, on scores that agree in their top 16 bits (1 + k ulp) with ties, zeros and a spread."""
    from elsa.optim.projection import _LOCAL_DIGITS, _SHARDED_DIGITS, _as_bits, _radix_select

    g = torch.Generator().manual_seed(11)
    near_one = 1.0 + torch.randint(0, 300, (90, 40), generator=g).float() * 2**-23  # many ties too
    score = torch.where(torch.rand(90, 40, generator=g) < 0.2, torch.rand(90, 40, generator=g) * 4, near_one)
    score[0, : 50 % 40] = 0.0
    bits = _as_bits(score)
    for keep in (1, 7, 500, 1800, 2900, 3599):
        local = _radix_select(bits, keep, None, _LOCAL_DIGITS)
        sharded = _radix_select(bits, keep, None, _SHARDED_DIGITS)
        kth = score.reshape(-1).sort(descending=True).values[keep - 1]
        assert local == sharded and local[0] == int(kth.view(torch.int32)), f"keep={keep}"
        assert local[2] == int((score == kth).sum())  # every entry equal to the threshold, counted
        assert torch.equal(topk_mask(score, keep), ref_topk(score, keep)), f"keep={keep}"


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("input_dim", [1, 0])
def test_nm_matches_brute_force(n, m, input_dim):
    shape = (12, 16) if input_dim == 1 else (16, 12)  # input dimension 16 in both cases
    for seed in range(3):
        score = tied_scores(shape, 3 + seed, seed)
        mask = nm_mask(score, n, m, input_dim)
        assert torch.equal(mask, ref_nm(score, n, m, input_dim))
        assert torch.equal(project_mask(score, -1, (n, m), input_dim), mask)  # keep is ignored for N:M
        groups = (mask if input_dim == 1 else mask.t()).reshape(shape[1 - input_dim], -1, m).sum(-1)
        assert bool((groups == n).all())


# ---------------------------------------------------------------- row-sharded over 2 processes


# (rows on rank 0, keep) on a 8 x 10 matrix; the last case leaves rank 0 without rows
SHARD_CASES = [(4, k) for k in (1, 13, 40, 41, 57, 79)] + [(3, 30), (1, 45), (7, 22), (0, 33)]


def _sharded_worker(rank: int, world: int, port: int, scores: list, out_dir: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = []
        for score, (split, keep) in zip(scores, SHARD_CASES):
            block = score[:split] if rank == 0 else score[split:]
            results.append(topk_mask(block.contiguous(), keep, group=dist.group.WORLD))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_topk_row_sharded_over_two_processes_matches_single_process(tmp_path):
    scores = []
    for i, (split, keep) in enumerate(SHARD_CASES):
        score = tied_scores((8, 10), 3, 100 + i)
        # a tie that straddles the shard boundary at the threshold: same value both sides of it
        if 0 < split < 8:
            threshold_value = score.reshape(-1).sort(descending=True).values[keep - 1]
            score[split - 1, -3:] = threshold_value
            score[split, :3] = threshold_value
        scores.append(score)
    mp.spawn(_sharded_worker, args=(2, free_port(), scores, str(tmp_path)), nprocs=2, join=True)
    masks0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    masks1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    partial_straddling_ties = 0
    for score, (split, keep), m0, m1 in zip(scores, SHARD_CASES, masks0, masks1):
        sharded = torch.cat([m0, m1])
        single = topk_mask(score, keep)
        assert torch.equal(single, ref_topk(score, keep))
        assert torch.equal(sharded, single), f"split={split}, keep={keep}"
        kth = score.reshape(-1).sort(descending=True).values[keep - 1]
        ties = score == kth
        kept_ties = int((ties & single).sum())
        if 0 < split < 8 and ties[:split].any() and ties[split:].any() and 0 < kept_ties < int(ties.sum()):
            partial_straddling_ties += 1
    assert partial_straddling_ties >= 5  # the threshold tie spans both shards and is cut inside one


# ---------------------------------------------------------------- objective-aware projection


def test_fisher_projection_keeps_small_high_curvature_weight():
    w = torch.tensor([[0.05, 1.0, 0.9, -0.8, 0.7, 0.6, -0.5, 0.4]])
    v = torch.tensor([[1e4, 1e-4, 1e-3, 1e-2, 1e-3, 1e-3, 1e-3, 1e-3]])
    keep = 3
    magnitude = topk_mask(magnitude_score(w), keep)
    fisher = topk_mask(fisher_score(w, v), keep)
    assert not bool(magnitude[0, 0]) and bool(fisher[0, 0])  # small, high-curvature weight survives
    brute = ref_topk(v * w * w, keep)
    assert torch.equal(fisher, brute)
    assert torch.equal(magnitude, ref_topk(w.abs(), keep))


def test_fisher_projection_through_admm_reads_adams_v():
    """After one Adam step v_hat = g^2 (bias-corrected), so the final projection ranks by g^2 x^2."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 24, generator=g)
    grad = torch.randn(16, 24, generator=g).abs() * torch.logspace(-3, 2, 24).expand(16, 24)
    param = torch.nn.Parameter(x0.clone())
    target = Target("w", param, 0.75, None, 1)
    base = torch.optim.Adam([param], lr=1e-2, betas=(0.9, 0.999))
    admm = ADMM(
        base, [target], admm_settings(total_steps=10, lmda=PenaltySchedule(0.0), interval=100, projection="fisher")
    )
    param.grad = grad.clone()
    admm.step()
    x1 = param.detach().clone()
    expected = ref_topk(grad * grad * x1 * x1, target.keep)
    (mask,) = admm.final_masks()
    assert torch.equal(mask, expected)
    assert not torch.equal(mask, ref_topk(x1.abs(), target.keep))  # differs from magnitude here
    admm.final_projection()
    assert torch.equal(param.detach() != 0, expected)
