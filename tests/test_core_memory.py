"""Bytes per pruned parameter: the analytic breakdown agrees with what live optimisers hold."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core_settings import admm_settings
from elsa.optim.admm import ADMM, PenaltySchedule
from elsa.optim.memory import measured_state_bytes_per_param, state_bytes_per_param
from elsa.targets import find_targets


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(256, 512, bias=False)
        self.down = nn.Linear(512, 256, bias=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block() for _ in range(2)])
        self.head = nn.Linear(256, 8)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


def _base(kind: str, params):
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    import bitsandbytes as bnb

    return bnb.optim.Adam8bit(params, lr=1e-3)


def _live(
    kind: str, z_dtype: str, u_dtype: str, z_sparse: bool, sparsity: float, steps: int = 3, fisher_source: str = "adam"
):
    torch.manual_seed(0)
    model = _Net()
    targets = find_targets(model, sparsity)
    assert len(targets) == 4 and all(t.numel >= 4096 for t in targets)
    projection = "magnitude" if kind == "sgd" else "fisher"
    admm = ADMM(
        _base(kind, model.parameters()),
        targets,
        admm_settings(
            total_steps=steps,
            lmda=PenaltySchedule(1e-2),
            interval=2,
            projection=projection,
            z_dtype=z_dtype,
            u_dtype=u_dtype,
            z_sparse=z_sparse,
            fisher_source=fisher_source,
        ),
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        admm.zero_grad()
        model(torch.randn(16, 256, generator=g)).pow(2).mean().backward()
        admm.step()
    return model, admm


CASES = {
    "fp32-elsa": ("adam", "fp32", "fp32", False, 0.7),
    "elsa-l": ("adam8bit", "fp8_e4m3", "bf16", False, 0.9),
    "elsa-l-sparse-z-90": ("adam8bit", "fp8_e4m3", "bf16", True, 0.9),
    "adam-int8-u-sparse-e5m2-z": ("adam", "fp8_e5m2", "int8", True, 0.8),
    "sgd": ("sgd", "bf16", "fp32", False, 0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_analytic_matches_measured(case):
    kind, z_dtype, u_dtype, z_sparse, sparsity = CASES[case]
    _, admm = _live(kind, z_dtype, u_dtype, z_sparse, sparsity)
    analytic = state_bytes_per_param(kind, z_dtype, u_dtype, z_sparse, sparsity)
    measured = measured_state_bytes_per_param(admm)
    params = measured["params"]
    assert params == sum(t.numel for t in admm.targets)
    # per-tensor constants: scales and step counters (a few bytes), one 1 KiB quantisation map
    # per moment (shared by all tensors in bitsandbytes), one value more or less in a sparse z
    tolerance = (2 * 1024 + 64 * len(admm.targets)) / params
    for key in ("m", "v", "z", "u"):
        assert measured[key] == pytest.approx(analytic[key], abs=tolerance), key
    assert measured["other"] <= tolerance
    assert measured["states"] == pytest.approx(analytic["states"], abs=3 * tolerance)
    assert measured["weight"] == analytic["weight"] == 4.0
    assert measured["grad"] == analytic["grad"] == 4.0  # gradients are still held after step()
    assert measured["total"] == pytest.approx(analytic["total"], abs=3 * tolerance)


def test_headline_figures():
    fp32 = state_bytes_per_param("adam", "fp32", "fp32", False, 0.9)
    assert (fp32["total"], fp32["states"]) == (24.0, 16.0)
    elsa_l = state_bytes_per_param("adam8bit", "fp8_e4m3", "bf16", False, 0.9)
    assert elsa_l["states"] == pytest.approx(2 * (1 + 4 / 256) + 2 + 1)
    sparse = state_bytes_per_param("adam8bit", "fp8_e4m3", "bf16", True, 0.9)
    assert sparse["z"] == pytest.approx(0.125 + 0.1)
    assert sparse["states"] < elsa_l["states"] < fp32["states"]
    no_wg = state_bytes_per_param("adam", include_weight_and_grad=False)
    assert no_wg["total"] == no_wg["states"] == 16.0
    with pytest.raises(ValueError, match="optimizer"):
        state_bytes_per_param("lion")
    with pytest.raises(ValueError, match="dtype"):
        state_bytes_per_param("adam", z_dtype="fp16")


def test_checkpointing_does_not_change_memory_held():
    """state_dict() must not leave dense copies of a sparse z in the base optimiser's state."""
    _, admm = _live("adam", "fp8_e4m3", "bf16", True, 0.9)
    before = measured_state_bytes_per_param(admm)
    admm.state_dict()
    after = measured_state_bytes_per_param(admm)
    assert after["z"] == pytest.approx(before["z"]) and after["u"] == pytest.approx(before["u"])


def test_loss_fisher_costs_four_bytes_per_pruned_entry():
    _, admm = _live("adam8bit", "fp8_e4m3", "bf16", False, 0.9, fisher_source="loss")
    measured = measured_state_bytes_per_param(admm)
    analytic = state_bytes_per_param("adam8bit", "fp8_e4m3", "bf16", False, 0.9, loss_fisher=True)
    assert measured["fisher"] == analytic["fisher"] == 4.0
    without = state_bytes_per_param("adam8bit", "fp8_e4m3", "bf16", False, 0.9)
    assert analytic["states"] == pytest.approx(without["states"] + 4.0)
    assert measured["states"] == pytest.approx(analytic["states"], abs=0.05)
