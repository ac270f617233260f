"""The little the method needs to know about sharding: local shards and their process group.

Under FSDP2 a parameter is a ``DTensor`` sharded row-wise (``Shard(0)``) over a 1-D mesh. The
ADMM states live as plain local tensors of this rank's rows; reductions that must be global
(a matrix's top-k threshold, a per-tensor scale, the primal residual) go over the mesh group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

try:  # DTensor is public from torch 2.5 on
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = None
    Shard = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard (the tensor itself when not distributed); shares storage."""
    return t._local_tensor if is_dtensor(t) else t


def shard_group(param: torch.Tensor):
    """The process group a parameter is row-sharded over, or None for a plain tensor."""
    if not is_dtensor(param):
        return None
    placements = tuple(param.placements)
    if len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise NotImplementedError(f"ADMM supports row-sharded (Shard(0)) parameters, got placements {placements}")
    return param.device_mesh.get_group()


def like_param(local_tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Wrap a shard-shaped local tensor as a DTensor laid out like ``param`` (for checkpoints)."""
    if not is_dtensor(param):
        return local_tensor
    return DTensor.from_local(
        local_tensor, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    )


def all_reduce_sum(values: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(values, group=group)
    return values
