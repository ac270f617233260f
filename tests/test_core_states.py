"""ELSA-L storage formats: each round-trips within its format's error bound, sparse z is lossless
with fp32 values, and the bitmask packing is the little-endian layout numpy also writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elsa.optim.states import FORMATS, StoredTensor, pack_mask, unpack_mask

# unit roundoff (relative error of round-to-nearest for normal values) and the spacing of the
# subnormals of each float format; int8 is absolute: half a quantisation step
FLOAT_BOUNDS = {
    "bf16": dict(rel=2.0**-8, subnormal_step=None),  # bf16 has fp32's range: no subnormals here
    "fp8_e4m3": dict(rel=2.0**-4, subnormal_step=2.0**-9),
    "fp8_e5m2": dict(rel=2.0**-3, subnormal_step=2.0**-16),
}
PAYLOAD = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}
VMAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "int8": 127.0}


def _sample(seed: int, n: int = 20000) -> torch.Tensor:
    """Values over many decades and both signs, with exact zeros, like u and z."""
    g = torch.Generator().manual_seed(seed)
    magnitude = 10.0 ** (torch.rand(n, generator=g) * 10 - 8)  # 1e-8 .. 1e2
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x = magnitude * sign
    x[torch.rand(n, generator=g) < 0.1] = 0.0
    return x.view(100, -1)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_within_format_bound(fmt, seed):
    x = _sample(seed)
    codec = StoredTensor(fmt)
    entry = codec.encode(x)
    assert entry["q"].dtype == PAYLOAD[fmt] and entry["q"].shape == x.shape
    y = codec.decode(entry, x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    if fmt == "fp32":
        assert torch.equal(y, x)
        return
    err = (y - x).abs()
    fp32_slack = 4 * 2.0**-24 * x.abs() + 1e-45  # the fp32 divide and multiply around the cast
    if fmt == "int8":
        scale = float(x.abs().max()) / VMAX["int8"]
        assert float(entry["scale"]) == pytest.approx(scale, rel=1e-6)
        assert bool((err <= scale / 2 * (1 + 1e-5) + fp32_slack).all())
        assert float(err.max()) > 0.4 * scale  # the bound is met, not beaten: really 8 bits
        return
    bound = FLOAT_BOUNDS[fmt]
    if fmt == "bf16":
        assert float(entry["scale"]) == 1.0
        allowed = bound["rel"] * x.abs() + fp32_slack
    else:
        scale = float(x.abs().max()) / VMAX[fmt]
        assert float(entry["scale"]) == pytest.approx(scale, rel=1e-6)
        # normal values: relative; below the smallest normal: half a subnormal step, times the scale
        allowed = (
            torch.maximum(bound["rel"] * x.abs(), torch.full_like(x, bound["subnormal_step"] / 2 * scale)) + fp32_slack
        )
        # the largest magnitude survives exactly (it maps onto vmax)
        i = int(x.abs().argmax())
        assert float(y.view(-1)[i]) == pytest.approx(float(x.view(-1)[i]), rel=1e-6)
    assert bool((err <= allowed).all()), float((err / allowed).max())
    normal = x.abs() > 1e-3 * float(x.abs().max())
    worst = float((err[normal] / x.abs()[normal]).max())
    assert worst > 0.5 * bound["rel"]  # really that many mantissa bits, not more
    assert bool((y[x == 0] == 0).all())


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_all_zero_tensor(fmt):
    x = torch.zeros(5, 7)
    codec = StoredTensor(fmt)
    y = codec.decode(codec.encode(x), x)
    assert torch.equal(y, x)
    sparse = StoredTensor(fmt, sparse=True)
    entry = sparse.encode(x)
    assert entry["q"].numel() == 0
    assert torch.equal(sparse.decode(entry, x), x)


def _sparse_z(seed: int, shape=(96, 80), sparsity=0.9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    keep = torch.rand(shape, generator=g) >= sparsity
    return z * keep


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_z_is_lossless_with_fp32_values(seed):
    z = _sparse_z(seed)
    codec = StoredTensor("fp32", sparse=True)
    entry = codec.encode(z)
    nnz = int((z != 0).sum())
    assert entry["q"].numel() == nnz and entry["q"].dtype == torch.float32
    assert entry["bits"].dtype == torch.uint8 and entry["bits"].numel() == -(-z.numel() // 8)
    assert StoredTensor.nbytes(entry) == nnz * 4 + -(-z.numel() // 8) + 4
    assert torch.equal(codec.decode(entry, z), z)
    # checkpoint form: densified (same payload format) and compacted back, bit-exact
    dense = codec.densify(entry, z)
    assert dense["q"].shape == z.shape and torch.equal(dense["q"], z)
    back = codec.compact(dense, z)
    assert all(torch.equal(back[k], entry[k]) for k in entry)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "int8", "bf16"])
def test_sparse_z_decodes_like_dense_storage(fmt):
    z = _sparse_z(5)
    sparse, dense = StoredTensor(fmt, sparse=True), StoredTensor(fmt)
    a = sparse.decode(sparse.encode(z), z)
    b = dense.decode(dense.encode(z), z)
    assert torch.equal(a, b)  # same global scale, same rounding; only the layout differs
    entry = sparse.encode(z)
    back = sparse.decode(sparse.compact(sparse.densify(entry, z), z), z)
    assert torch.equal(back, a)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 65, 1000])
def test_pack_unpack_mask_round_trip(n):
    g = torch.Generator().manual_seed(n)
    for density in (0.0, 0.1, 0.5, 1.0):
        mask = torch.rand(n, generator=g) < density
        bits = pack_mask(mask)
        assert bits.dtype == torch.uint8 and bits.numel() == -(-n // 8)
        expected = np.packbits(mask.numpy().astype(np.uint8), bitorder="little")
        assert np.array_equal(bits.numpy(), expected)
        assert torch.equal(unpack_mask(bits, n), mask)
    mask2d = torch.rand(13, 11, generator=g) < 0.3
    assert torch.equal(unpack_mask(pack_mask(mask2d), mask2d.numel()).view(13, 11), mask2d)


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="fp16"):
        StoredTensor("fp16")
