"""Sparsity projections: which entries of a matrix survive.

One function family, ``(score, pattern) -> mask``, where the score is |x| (Euclidean
projection) or v * x^2 (objective-aware: the norm induced by Adam's diagonal Fisher estimate).

Unstructured masks keep exactly ``keep`` entries per matrix. Ties are broken
deterministically: among equal scores the lower flat index wins. The threshold is found by a
radix select over the float bit patterns (non-negative floats order like their int32 bits), a
histogram per digit, so a matrix sharded row-wise over ranks (FSDP2's ``Shard(0)``) needs only
four all-reduced 256-bin histograms and one all-gathered tie count, never the whole matrix on
one rank, and gives bit-for-bit the mask a single process gives. One process takes the top 15
bits in one 32k-bin histogram instead: one pass over the matrix, then a few hundred candidates
(3.0-3.4x faster over SmolLM2's 210 matrices, the same masks: bench/projection_speed.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def magnitude_score(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().abs()


def fisher_score(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """v * x^2: the diagonal-Fisher-weighted magnitude (v = Adam's second moment)."""
    x = x.detach().float()
    return v.float() * x * x


def _as_bits(score: torch.Tensor) -> torch.Tensor:
    if torch.isnan(score).any():
        raise ValueError("projection score contains NaN: the weights or the optimiser state diverged")
    # + 0.0 turns -0.0 into +0.0, whose bit pattern orders correctly
    return (score.float().reshape(-1) + 0.0).clamp_(min=0.0).view(torch.int32)


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


def topk_mask(score: torch.Tensor, keep: int, group=None) -> torch.Tensor:
    """Boolean mask keeping exactly the ``keep`` largest scores of the whole matrix.

    ``score`` is this rank's row-block of the matrix (ranks of ``group`` hold consecutive
    blocks in rank order); with ``group=None`` it is the whole matrix.
    """
    bits = _as_bits(score)
    total = torch.tensor([bits.numel()], dtype=torch.int64, device=bits.device)  # NCCL: on the GPU
    total = int(_all_reduce(total, group))
    if not 0 <= keep <= total:
        raise ValueError(f"keep={keep} outside [0, {total}]")
    if keep == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if keep == total:
        return torch.ones_like(score, dtype=torch.bool)
    if group is None and bits.device.type != "cpu":
        return _device_topk_mask(bits, keep).view(score.shape)

    digits = _SHARDED_DIGITS if group is not None else _LOCAL_DIGITS
    threshold_bits, take, ties_total = _radix_select(bits, keep, group, digits)
    threshold = torch.tensor(threshold_bits, dtype=torch.int32)
    if take == ties_total:  # every entry equal to the threshold is kept (always so when it is unique)
        return (bits >= threshold).view(score.shape)
    mask = bits > threshold
    ties = bits == threshold
    # ``take`` ties are kept, lowest global index first
    local_ties = int(ties.sum())
    before = 0
    if group is not None:
        counts = [torch.zeros(1, dtype=torch.int64, device=bits.device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(counts, torch.tensor([local_ties], dtype=torch.int64, device=bits.device), group=group)
        before = int(sum(int(c) for c in counts[: dist.get_rank(group)]))
    take = min(max(take - before, 0), local_ties)
    if take:
        mask[ties.nonzero().squeeze(1)[:take]] = True
    return mask.view(score.shape)


# Digits of the radix select, (shift, width), most significant first. One process takes the top
# 15 bits at once (the sign bit of a non-negative score is 0): one pass over the matrix then only
# a few hundred candidates; sharded matrices keep 256-bin digits, small histograms to all-reduce.
_LOCAL_DIGITS = ((16, 15), (8, 8), (0, 8))
_SHARDED_DIGITS = ((24, 8), (16, 8), (8, 8), (0, 8))


def _radix_select(bits: torch.Tensor, keep: int, group, digits) -> tuple[int, int, int]:
    """The bit pattern of the ``keep``-th largest score over all shards, how many entries equal
    to it are kept, and how many there are (all shards)."""
    prefix = 0  # bits of the keep-th largest score, found one digit at a time from the top
    remaining = keep  # how many of the candidates sharing ``prefix`` still need keeping
    candidates = bits
    for shift, width in digits:
        digit = candidates >> shift
        if shift + width < 31:
            digit = digit & ((1 << width) - 1)
        hist = _all_reduce(torch.bincount(digit, minlength=1 << width), group)
        from_top = hist.flip(0).cumsum(0)  # from_top[j]: candidates whose digit >= top - j
        j = int(torch.searchsorted(from_top, torch.tensor([remaining], device=from_top.device), right=False))
        chosen = (1 << width) - 1 - j
        remaining -= int(from_top[j] - hist[chosen])
        prefix |= chosen << shift
        if shift:
            candidates = candidates[digit == chosen]
    return prefix, remaining, int(hist[chosen])


def _device_topk_mask(bits: torch.Tensor, keep: int) -> torch.Tensor:
    """The same mask for a whole matrix on one accelerator, without waiting on the host.

    Why apart: the radix select waits on the host after each byte, a fixed cost per matrix that
    dominates the z-update on a GPU. Here the threshold is the smallest of the top ``keep`` bit
    patterns, and the ties kept are the first ``keep - #above`` by a running count: the same
    unique mask. H200, bench/results/topk_device.json: 0.21 against 1.35 ms for 576 x 1536,
    2.0 against 6.2 ms for 4096 x 11008 (a kthvalue threshold took 304 ms there). CPUs keep
    the radix select.
    """
    return with_ties(bits, torch.topk(bits, keep, sorted=False).values.min(), keep)


def with_ties(bits: torch.Tensor, threshold: torch.Tensor, keep: int) -> torch.Tensor:
    """Every entry above ``threshold``, and the first ties until ``keep``: no host round trip."""
    mask = bits > threshold
    ties = bits == threshold
    return mask | (ties & (ties.cumsum(0) <= keep - mask.sum()))


def nm_mask(score: torch.Tensor, n: int, m: int, input_dim: int = 1) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive entries along the input dimension.

    Rows are complete on every rank under FSDP's row sharding of nn.Linear, so no
    communication is needed. Ties: the lower index wins (stable sort).
    """
    s = score if input_dim == 1 else score.t()
    if s.shape[-1] % m:
        raise ValueError(f"input dimension {s.shape[-1]} is not a multiple of M={m}")
    groups = s.reshape(s.shape[0], -1, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order[..., :n], True)
    mask = mask.reshape(s.shape)
    return mask if input_dim == 1 else mask.t()


def project_mask(
    score: torch.Tensor, keep: int, nm: tuple[int, int] | None, input_dim: int, group=None
) -> torch.Tensor:
    """The mask of one matrix for its pattern (unstructured top-k or N:M)."""
    if nm is not None:
        if input_dim == 0 and group is not None:
            raise NotImplementedError("N:M on a row-sharded Conv1D (input dim 0) would cut groups across ranks")
        return nm_mask(score, nm[0], nm[1], input_dim)
    return topk_mask(score, keep, group)
