"""The GPU check's one command, run as the device would run it, on tiny CPU shapes.

Why: the check runs on a lent GPU for a few minutes at a time, so a broken code path there costs
device time that cannot be had back. Here ``bench/gpu_check.sh --device cpu --tiny`` runs every
measurement through the same wrapper and the same elsa code, and the JSON it writes is checked
figure by figure: a path that breaks or a figure that goes missing fails here first.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "bench" / "results" / "gpu_check.json"


def _fingerprint(path: Path):
    return (path.stat().st_mtime_ns, path.read_bytes()) if path.exists() else None


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The JSON of one tiny CPU run (about 30 s on two busy cores); the committed JSON untouched."""
    out = tmp_path_factory.mktemp("gpu_check") / "check.json"
    before = _fingerprint(COMMITTED)
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("OUT", None)  # the device tool's return folder: not here
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _fingerprint(COMMITTED) == before, "the smoke run must not touch the committed results"
    assert "[gpu_check] wrote" in done.stdout
    return json.loads(out.read_text())


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_measurement_ran_and_the_run_is_described(report):
    assert report["errors"] == {} and report["skipped"] == []
    assert set(report["results"]) == {"projection", "prune_agreement", "state_memory", "admm_step_tiny_llama"}
    assert report["mode"] == "tiny" and report["device"] == "cpu"
    for key in ("date", "torch", "transformers", "python", "device_name"):
        assert report[key], key
    assert report["git_commit"] and len(report["git_commit"]) == 40


def test_admm_step_against_adam(report):
    result = report["results"]["admm_step_tiny_llama"]
    assert 0 < result["target_params"] < result["params"]
    assert _finite_positive(result["adam"]["step_ms"]) and _finite_positive(result["adam"]["optimizer_ms"])
    for penalty in ("coupled", "decoupled"):
        row = result[penalty]
        for key in ("step_ms", "optimizer_ms", "split_ms", "optimizer_ratio", "step_ratio", "amortized_step_ratio"):
            assert _finite_positive(row[key]), (penalty, key, row[key])
        assert row["interval_rule"] >= 1
        assert row["step_ratio"] == pytest.approx(row["step_ms"] / result["adam"]["step_ms"])
        assert row["amortized_step_ratio"] > row["step_ratio"]


def test_projection_keeps_exactly_what_it_should(report):
    result = report["results"]["projection"]
    rows, cols = result["shape"]
    for name in ("topk_0.7", "topk_0.9", "nm_2:4"):
        assert _finite_positive(result[name]["ms"]), name
        assert result[name]["kept"] == result[name]["expected_kept"], name
    assert result["nm_2:4"]["kept"] == rows * cols // 2
    assert result["topk_0.9"]["kept"] < result["topk_0.7"]["kept"]


def test_state_memory_per_parameter(report):
    result = report["results"]["state_memory"]
    fp32, sparse = result["fp32"], result["fp32_sparse_z"]
    assert fp32["held"] == pytest.approx(fp32["analytic"], rel=1e-3)  # m, v, z, u: 4 bytes each
    assert sparse["held"] == pytest.approx(sparse["analytic"], rel=1e-3)  # z: 1/8 bit mask + 10% of 4 bytes
    for name in ("elsa_l", "elsa_l_sparse_z"):
        row = result[name]
        assert row["base"] == "bitsandbytes", row
        assert row["held_parts"]["u"] == pytest.approx(2.0, rel=1e-2)  # bf16 u
        assert row["held"] < fp32["held"] / 2
    assert result["elsa_l"]["held_parts"]["z"] == pytest.approx(1.0, rel=1e-2)  # fp8 z
    assert result["elsa_l_sparse_z"]["held"] < result["elsa_l"]["held"]
    assert "peak" not in fp32  # allocator figures exist on a GPU only


def test_the_same_prune_twice_on_the_cpu_agrees_exactly(report):
    result = report["results"]["prune_agreement"]
    assert result["devices"] == ["cpu", "cpu"]
    for precision in ("fp32", "bf16"):
        row = result[precision]
        assert row["mask_entries"] > 0
        assert row["masks_equal"] and row["masks_differing"] == 0 and "reason" not in row
        assert row["loss_max_rel_diff"] == 0.0 and row["losses_within_tolerance"]
        first, second = row["losses"]
        assert len(first) == result["steps"] and all(math.isfinite(x) for x in first) and first == second
