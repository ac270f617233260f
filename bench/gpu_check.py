"""One-command GPU check of ELSA's core (issue 29, item 1): run by ``bash bench/gpu_check.sh``.

Why: the ADMM step's cost over plain Adam, the projection's, ELSA-L's state bytes and CPU/GPU
agreement were only measured on CPUs. Measured with ``elsa`` alone (no Ray, no MLflow) on random
models built from configs (no downloads); each measurement guarded (a failure is recorded, the rest
still run), the JSON rewritten after each. ``--device cpu --tiny``: the same code paths in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: elsa from this checkout, installed or not
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "bench" / "results" / "gpu_check.json"
BUDGET_S = 420.0  # measurements not started by then are skipped: the whole command stays under 8 min
BF16_LOSS_RTOL, FP32_LOSS_RTOL = 2e-2, 1e-3  # CPU vs GPU training losses of the tiny prune

_SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")  # Llama's
_SHAPE_FIELDS += ("intermediate_size", "vocab_size", "tie_word_embeddings")
SHAPES = {
    "smollm2_135m": (576, 30, 9, 3, 1536, 49152, True),
    "llama_1b": (2048, 16, 32, 8, 8192, 32000, False),
}
TINY_SHAPES = {"tiny_llama": (64, 2, 4, 2, 128, 256, True)}

# optimiser-state variants of the memory measurement (PruneConfig fields)
STATE_VARIANTS = {
    "fp32": {"optimizer": "adam", "z_dtype": "fp32", "u_dtype": "fp32"},
    "fp32_sparse_z": {"optimizer": "adam", "z_dtype": "fp32", "u_dtype": "fp32", "z_sparse": True},
    "elsa_l": {"optimizer": "adam8bit", "z_dtype": "fp8_e4m3", "u_dtype": "bf16"},
    "elsa_l_sparse_z": {"optimizer": "adam8bit", "z_dtype": "fp8_e4m3", "u_dtype": "bf16", "z_sparse": True},
}


@dataclass(frozen=True)
class Scale:
    """How big each measurement is: the device run's sizes, or the tiny smoke run's."""

    shapes: dict = field(default_factory=lambda: SHAPES)
    batch: int = 4
    seqlen: int = 512
    warmup: int = 3
    timed: int = 10
    matrix: tuple[int, int] = (4096, 11008)
    reps: int = 5
    memory_shape: str = "smollm2_135m"
    prune_steps: int = 16


FULL = Scale()
TINY = Scale(TINY_SHAPES, 2, 32, 1, 2, (256, 512), 2, "tiny_llama", 4)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds of ``fn()`` with the device's queued work included (a GPU runs asynchronously)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def free(device: torch.device) -> None:
    """Give cached blocks back, so that each measurement starts from the memory it needs alone."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_llama(shape: tuple, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised fp32 Llama of ``shape``, built on ``device`` (no download, no host copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=2048, **dict(zip(_SHAPE_FIELDS, shape)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlamaForCausalLM(config)
    return model.to(device).train()  # to(): a no-op, unless a transformers version builds on the host


def random_batch(vocab: int, scale: Scale, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (scale.batch, scale.seqlen), generator=generator).to(device)


def prune_config(**fields):
    """A validated PruneConfig: 70%, coupled, no warm start; an unset lr gets the rule's unscaled one."""
    from elsa.budget import LR
    from elsa.config import make_config

    base = {"model": "random", "sparsity": 0.7, "steps": 1000, "init": "none", "loss": "ntp", "penalty": "coupled"}
    cfg = make_config(base, fields)
    return cfg if cfg.lr is not None else cfg.model_copy(update={"lr": LR})


def loss_backward(model: torch.nn.Module, ids: torch.Tensor, device: torch.device) -> None:
    """Forward and backward under bf16 autocast, then clipping: the x-update's gradient as the loop makes it."""
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


# --- measurement 1: the ADMM step against the base Adam step ---
def time_steps(model, ids, optimizer, scale: Scale, device) -> dict:
    """Median ms of a whole step (forward, backward, clip, optimiser) and of the optimiser step alone."""
    whole, alone = [], []
    for index in range(scale.warmup + scale.timed):
        _sync(device)
        start = time.perf_counter()
        loss_backward(model, ids, device)
        optimizer_s = timed(optimizer.step, device)
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if index >= scale.warmup:
            whole.append(time.perf_counter() - start)
            alone.append(optimizer_s)
    return {"step_ms": 1e3 * statistics.median(whole), "optimizer_ms": 1e3 * statistics.median(alone)}


def admm_row(model, ids, penalty: str, adam: dict, scale: Scale, device) -> dict:
    """ELSA's ADMM around Adam (as elsa.loop builds it), its z/u-update timed apart and amortised.

    The timed steps run no z/u-update (interval 10^6); it is timed on its own and spread over the
    interval the budget rule picks for a 1000-step run."""
    from elsa.loop import build_admm

    admm, _ = build_admm(model, prune_config(penalty=penalty, interval=10**6))
    row = time_steps(model, ids, admm, scale, device)
    admm.update_split()  # warm-up: first-call kernels and allocations
    row["split_ms"] = 1e3 * statistics.median(timed(admm.update_split, device) for _ in range(3))
    row["interval_rule"] = interval = prune_config(penalty=penalty).interval
    row["optimizer_ratio"] = row["optimizer_ms"] / adam["optimizer_ms"]
    row["step_ratio"] = row["step_ms"] / adam["step_ms"]
    row["amortized_step_ratio"] = (row["step_ms"] + row["split_ms"] / interval) / adam["step_ms"]
    del admm
    return row


def measure_admm_step(shape: tuple, scale: Scale, device: torch.device) -> dict:
    """ms per step of plain Adam and of the ADMM (coupled and decoupled penalty), and their ratios."""
    from elsa.loop import build_base_optimizer, freeze_embeddings
    from elsa.targets import config_targets

    model = random_llama(shape, device)
    ids = random_batch(shape[5], scale, device)
    cfg = prune_config(interval=10**6)
    if not cfg.train_embeddings:
        freeze_embeddings(model)  # as build_admm does: both optimisers see the same parameters
    out = {"params": sum(p.numel() for p in model.parameters())}
    out["target_params"] = sum(t.numel for t in config_targets(model, cfg))
    out["tokens_per_step"] = ids.numel()
    adam = build_base_optimizer(model.parameters(), cfg)
    out["adam"] = time_steps(model, ids, adam, scale, device)
    del adam
    free(device)
    for penalty in ("coupled", "decoupled"):
        out[penalty] = admm_row(model, ids, penalty, out["adam"], scale, device)
        free(device)
    return out


# --- measurement 2: the projection ---
def measure_projection(scale: Scale, device: torch.device) -> dict:
    """ms of elsa's projection of one matrix: exact top-k at 70% and 90%, and 2:4."""
    from elsa.optim.projection import project_mask
    from elsa.targets import keep_count

    rows, cols = scale.matrix
    generator = torch.Generator().manual_seed(0)
    score = torch.rand(rows, cols, generator=generator).to(device)
    out: dict = {"shape": [rows, cols]}
    for name, sparsity, nm in (("topk_0.7", 0.7, None), ("topk_0.9", 0.9, None), ("nm_2:4", 0.5, (2, 4))):
        keep = keep_count(score.numel(), sparsity)
        mask = project_mask(score, keep, nm, 1)  # warm-up: kernels and allocator
        times = [timed(lambda: project_mask(score, keep, nm, 1), device) for _ in range(scale.reps)]
        out[name] = {"ms": 1e3 * statistics.median(times), "kept": int(mask.sum()), "expected_kept": keep}
    return out


# --- measurement 3: optimiser-state memory per parameter ---
def state_memory(model, ids, cfg, device) -> dict:
    """Bytes per pruned parameter that the ADMM's states take, after one step with its z/u-update.

    ``peak`` and ``resident`` are the allocator's figures over the gradients already there (GPU
    only); ``held`` is what elsa.optim.memory counts in the live states; ``analytic`` the formula's.
    """
    from elsa.loop import build_admm
    from elsa.optim.memory import measured_state_bytes_per_param, state_bytes_per_param

    loss_backward(model, ids, device)  # the gradients exist before: they are no optimiser state
    free(device)
    cuda = device.type == "cuda"
    if cuda:
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    admm, _ = build_admm(model, cfg)  # optimizer adam8bit: bitsandbytes' Adam8bit, as in a run
    admm.step()  # Adam's state appears at its first step; interval 1 runs the z/u-update in it
    held = measured_state_bytes_per_param(admm)
    params = held["params"]
    out = {"base": type(admm.base).__module__.split(".")[0], "params": params, "held": held["states"]}
    out["analytic"] = state_bytes_per_param(
        cfg.optimizer, cfg.z_dtype, cfg.u_dtype, cfg.z_sparse, cfg.sparsity, include_weight_and_grad=False
    )["states"]
    out["held_parts"] = {key: held[key] for key in ("m", "v", "other", "z", "u")}
    if cuda:
        out["resident"] = (torch.cuda.memory_allocated(device) - before) / params
        out["peak"] = (torch.cuda.max_memory_allocated(device) - before) / params
    admm.zero_grad()
    del admm
    free(device)
    return out


def measure_state_memory(scale: Scale, device: torch.device) -> dict:
    """Per variant (fp32, ELSA-L, sparse z) the bytes per pruned parameter at 90% sparsity.

    A variant that fails (bitsandbytes missing or broken for the 8-bit ones) records its error
    as its figure, and the other variants still run.
    """
    model = random_llama(scale.shapes[scale.memory_shape], device)
    ids = random_batch(scale.shapes[scale.memory_shape][5], scale, device)
    out: dict = {"shape": scale.memory_shape, "sparsity": 0.9}
    for name, fields in STATE_VARIANTS.items():
        cfg = prune_config(sparsity=0.9, interval=1, **fields)
        try:
            out[name] = state_memory(model, ids, cfg, device)
        except Exception as error:  # noqa: BLE001 - recorded, the next variant still runs
            model.zero_grad(set_to_none=True)
            out[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
    return out


# --- measurement 4: a tiny prune on the device and on the CPU ---
def tiny_prune(device: torch.device, steps: int, bf16: bool) -> dict:
    """A seeded tiny ELSA prune (elsa.tiny's Llama, bundled text): its masks, losses and final loss."""
    from elsa.methods import get_method
    from elsa.targets import config_targets
    from elsa.tiny import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", len(tokenizer), seed=0).to(device)
    fields = {"steps": steps, "interval": 2, "seqlen": 64, "batch_size": 2, "val_blocks": 2, "bf16": bf16}
    cfg = prune_config(model="tiny", val_data=[], **fields)
    summary = get_method("elsa").run(model, tokenizer, cfg, None, None)
    return {
        "masks": [(t.param.detach() != 0).cpu() for t in config_targets(model, cfg)],
        "losses": [row["train_loss"] for row in summary["history"]],
        "final": summary["final_val_loss_projected"],
    }


def compare_prunes(first: dict, second: dict, rtol: float, precision: str) -> dict:
    """Masks entry by entry and losses step by step; says why masks differ when they do."""
    differing = sum(int((a != b).sum()) for a, b in zip(first["masks"], second["masks"]))
    entries = sum(a.numel() for a in first["masks"])
    pairs = list(zip(first["losses"], second["losses"])) + [(first["final"], second["final"])]
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs)
    out = {"mask_entries": entries, "masks_differing": differing, "masks_equal": differing == 0}
    out.update({"loss_max_rel_diff": worst, "loss_rtol": rtol, "losses_within_tolerance": worst <= rtol})
    out["losses"] = [first["losses"], second["losses"]]
    if differing:
        out["reason"] = f"{precision} rounding differs by device (losses {worst:.2g} apart): near-threshold scores swap"
    return out


def measure_prune_agreement(scale: Scale, device: torch.device) -> dict:
    """The same seeded tiny prune on ``device`` and on the CPU, in fp32 and under bf16 autocast."""
    cpu = torch.device("cpu")
    out: dict = {"steps": scale.prune_steps, "devices": [device.type, cpu.type]}
    for precision, bf16, rtol in (("fp32", False, FP32_LOSS_RTOL), ("bf16", True, BF16_LOSS_RTOL)):
        runs = [tiny_prune(d, scale.prune_steps, bf16) for d in (device, cpu)]
        out[precision] = compare_prunes(*runs, rtol, precision)
    return out


def guarded_call(fn) -> dict:
    """``fn()``'s figures, or its error and the end of its traceback: a failure never stops the run."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - recorded in the JSON, the next measurement still runs
        return {"error": f"{type(error).__name__}: {error}"[:500], "traceback": traceback.format_exc()[-2000:]}


def errors_in(name: str, result: dict) -> dict:
    """A measurement's error, and those of its parts (a memory variant), by dotted name."""
    found = {name: result["error"]} if "error" in result else {}
    for key, value in result.items():
        if isinstance(value, dict) and "error" in value:
            found[f"{name}.{key}"] = value["error"]
    return found


def measurements(scale: Scale, device: torch.device) -> list[tuple[str, object]]:
    """(name, thunk) in the order they run: the cheap, telling ones first."""
    plan: list[tuple[str, object]] = [("projection", lambda: measure_projection(scale, device))]
    plan.append(("prune_agreement", lambda: measure_prune_agreement(scale, device)))
    plan.append(("state_memory", lambda: measure_state_memory(scale, device)))
    for name, shape in scale.shapes.items():
        plan.append((f"admm_step_{name}", lambda shape=shape: measure_admm_step(shape, scale, device)))
    return plan


def git_commit() -> tuple[str | None, str]:
    """The commit gpu_carry.sh wrote (the device's copy has a git HEAD of an older base), else git's."""
    carried = REPO / ".whl" / "COMMIT"
    if carried.is_file():
        return carried.read_text().strip(), "carried"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return (done.stdout.strip(), "git") if done.returncode == 0 else (None, "unknown")
    return None, "unknown"


def environment(device: torch.device, tiny: bool) -> dict:
    """Date, commit, versions and the device: what a figure needs to be compared with another."""
    import transformers

    out = dict(zip(("git_commit", "git_commit_source"), git_commit()), mode="tiny" if tiny else "full")
    out["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out.update(torch=torch.__version__, cuda=torch.version.cuda, transformers=transformers.__version__)
    out.update(python=platform.python_version(), device=device.type)
    out["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return out


def write(report: dict, out: Path) -> None:
    """Write through a temporary file, so a run killed mid-write leaves the previous JSON whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(report, indent=2, default=float, allow_nan=True) + "\n")
    os.replace(partial, out)


def run(device: torch.device, scale: Scale, tiny: bool, out: Path, budget_s: float, only=None) -> dict:
    """Every measurement (or those named in ``only``) in turn, each guarded and timed; the JSON rewritten after each."""
    started = time.monotonic()
    report = {**environment(device, tiny), "budget_s": budget_s, "results": {}, "errors": {}, "skipped": []}
    for name, thunk in [item for item in measurements(scale, device) if not only or item[0] in only]:
        if time.monotonic() - started > budget_s:
            report["skipped"].append(name)
            continue
        began = time.monotonic()
        result = guarded_call(thunk)
        result["wall_s"] = time.monotonic() - began
        report["results"][name] = result
        report["errors"].update(errors_in(name, result))
        free(device)
        report["elapsed_s"] = time.monotonic() - started
        write(report, out)
        print(f"[gpu_check] {name}: {result['wall_s']:.1f} s, failed: {errors_in(name, result) or 'none'}", flush=True)
    write(report, out)
    return report


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU smoke run of the same code paths")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the JSON (default: {DEFAULT_OUT})")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="start no measurement after this")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these measurements alone (names as in the JSON)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = run(device, TINY if args.tiny else FULL, args.tiny, args.out, args.budget_s, args.only)
    failed = ", ".join(report["errors"]) or "none"
    print(f"[gpu_check] wrote {args.out} in {report.get('elapsed_s', 0):.0f} s; failed: {failed}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
