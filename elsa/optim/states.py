"""Storage formats for the ADMM states z and u (ELSA-L).

A stored tensor is a payload plus one fp32 scale per tensor: ``R(q, s) = s * q``. For the
narrow formats the scale is dynamic, ``s = max|x| / v_max`` (Q of ELSA.md); for fp32 and bf16
it starts at 1. Keeping a scale for every format also makes rescaling the dual when lambda
changes an O(1) update of ``s`` instead of a pass over u.

``sparse`` storage (for z, which is exactly sparse by construction) keeps a bitmask packed
8 entries per byte plus the non-zeros in a value format: at 90% sparsity and fp8 values that is
0.125 + 0.1 bytes per parameter instead of 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Format:
    name: str
    dtype: torch.dtype
    vmax: float | None  # largest finite value of the payload; None: no range scaling needed
    rounding: str  # "cast" (float formats round to nearest on cast) or "int"

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


FORMATS: dict[str, Format] = {
    "fp32": Format("fp32", torch.float32, None, "cast"),
    "bf16": Format("bf16", torch.bfloat16, None, "cast"),
    "fp8_e4m3": Format("fp8_e4m3", torch.float8_e4m3fn, 448.0, "cast"),
    "fp8_e5m2": Format("fp8_e5m2", torch.float8_e5m2, 57344.0, "cast"),
    "int8": Format("int8", torch.int8, 127.0, "int"),
}


def global_amax(x: torch.Tensor, group=None) -> torch.Tensor:
    """max|x| over all shards of a tensor (all-reduced when ``group`` is given)."""
    amax = x.abs().max() if x.numel() else torch.zeros((), device=x.device)
    amax = amax.float().reshape(())
    if group is not None:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


def quantize(
    x: torch.Tensor, fmt: Format, group=None, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q(x): payload in ``fmt`` and its per-tensor scale (fp32 scalar tensor).

    ``amax`` defaults to max|x| over all shards of ``group``, so one process and N shards
    store the same values.
    """
    if fmt.vmax is None:
        return x.to(fmt.dtype), torch.ones((), dtype=torch.float32, device=x.device)
    if amax is None:
        amax = global_amax(x, group)
    scale = torch.where(amax > 0, amax / fmt.vmax, torch.ones_like(amax))
    scaled = x.float() / scale
    if fmt.rounding == "int":
        scaled = scaled.round_()
    return scaled.clamp_(-fmt.vmax, fmt.vmax).to(fmt.dtype), scale


def dequantize(payload: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """R(q, s) = s * q in fp32 (may alias an fp32 payload when s == 1: do not modify in place)."""
    if _is_one(scale):
        return payload.to(torch.float32)
    return payload.to(torch.float32) * scale


def _is_one(scale: torch.Tensor) -> bool:
    return scale.device.type == "cpu" and float(scale) == 1.0


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into uint8, 8 entries per byte (little-endian bit order)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a flat boolean tensor of ``numel`` entries."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(1) >> shifts) & 1).reshape(-1)[:numel].bool()


class StoredTensor:
    """One ADMM state tensor (z or u) held in a storage format, optionally sparse.

    The payload lives in plain local tensors (this rank's shard under FSDP); ``group`` is the
    process group over which the tensor is sharded, so the dynamic scale is global.
    """

    def __init__(self, fmt: str, sparse: bool = False):
        if fmt not in FORMATS:
            raise ValueError(f"state dtype {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
        self.fmt = FORMATS[fmt]
        self.sparse = sparse

    def encode(self, x: torch.Tensor, group=None) -> dict[str, torch.Tensor]:
        """Store ``x``; sparse storage keeps only its non-zero entries."""
        if not self.sparse:
            payload, scale = quantize(x, self.fmt, group)
            return {"q": payload, "scale": scale}
        mask = x != 0
        amax = global_amax(x, group) if self.fmt.vmax is not None else None
        values, scale = quantize(x[mask], self.fmt, amax=amax)
        return {"q": values, "scale": scale, "bits": pack_mask(mask)}

    def decode(self, entry: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The fp32 tensor R(q, s), shaped like ``like``."""
        if "bits" not in entry:
            return dequantize(entry["q"], entry["scale"]).view(like.shape)
        out = torch.zeros(like.numel(), dtype=torch.float32, device=like.device)
        out[unpack_mask(entry["bits"], like.numel())] = dequantize(entry["q"], entry["scale"])
        return out.view(like.shape)

    def densify(self, entry: dict[str, torch.Tensor], like: torch.Tensor) -> dict[str, torch.Tensor]:
        """A dense payload of the same values (for checkpoints: shard-shaped, format preserved)."""
        if "bits" not in entry:
            return entry
        dense = torch.zeros(like.numel(), dtype=entry["q"].dtype, device=like.device)
        dense[unpack_mask(entry["bits"], like.numel())] = entry["q"]
        return {"q": dense.view(like.shape), "scale": entry["scale"]}

    def compact(self, entry: dict[str, torch.Tensor], like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`densify`: the same decoded values (a kept entry stored as 0 drops its mask bit)."""
        payload = entry["q"].to(self.fmt.dtype).reshape(-1)
        scale = entry["scale"].to(torch.float32)
        if not self.sparse:
            return {"q": payload.view(like.shape), "scale": scale}
        mask = payload.to(torch.float32) != 0
        return {"q": payload[mask], "scale": scale, "bits": pack_mask(mask)}

    @staticmethod
    def nbytes(entry: dict[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in entry.values())
