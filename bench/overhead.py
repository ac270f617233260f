"""What ADMM costs on top of the base optimiser: time per step and bytes per pruned parameter.

A small Llama (the tiny tokenizer's vocabulary, hidden 256, 4 layers, by default) trains on
random token batches (seqlen 256, batch 4). Every variant owns an identical copy of the model and
its optimiser; the variants take turns in short rounds, so slow phases of a shared machine hit
all of them alike. A step is the whole training step (zero_grad, forward, backward, clipping,
optimiser step); the optimiser step alone is timed too. ADMM runs its z/u-update every
``interval`` (32) steps, so the median step is a plain x-update and the mean carries the
amortised z/u-update: both are reported, with their ratios to the base optimiser alone.

    python bench/overhead.py                       # writes bench/results/overhead.json
    python bench/overhead.py --steps 128 --threads 2

Memory: the analytic bytes per pruned parameter (elsa.optim.memory) for fp32 ELSA, the paper's ELSA-L
(8-bit Adam, bf16 u, fp8 z) and ELSA-L with a sparse z at 90%, next to what the live optimisers
of this run hold.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from elsa.config import make_config
from elsa.optim.admm import ADMM, ADMMSettings
from elsa.optim.memory import measured_state_bytes_per_param, state_bytes_per_param
from elsa.targets import find_targets
from elsa.tiny import TINY_VOCAB_SIZE

REPO = Path(__file__).resolve().parents[1]

# name: (base optimiser, ADMM settings or None for the base alone)
VARIANTS = {
    "adam": ("adam", None),
    "elsa-fp32": ("adam", dict(z_dtype="fp32", u_dtype="fp32")),
    "elsa-fp32-decoupled": ("adam", dict(z_dtype="fp32", u_dtype="fp32", penalty="decoupled", rho=0.03)),
    "adam8bit": ("adam8bit", None),
    "elsa-l": ("adam8bit", dict(z_dtype="fp8_e4m3", u_dtype="bf16")),
    "elsa-l-sparse-z": ("adam8bit", dict(z_dtype="fp8_e4m3", u_dtype="bf16", z_sparse=True)),
}
BASE_OF = {"elsa-fp32": "adam", "elsa-fp32-decoupled": "adam", "elsa-l": "adam8bit", "elsa-l-sparse-z": "adam8bit"}
MEMORY_CASES = {
    "elsa-fp32": dict(optimizer="adam", z_dtype="fp32", u_dtype="fp32", z_sparse=False),
    "elsa-l": dict(optimizer="adam8bit", z_dtype="fp8_e4m3", u_dtype="bf16", z_sparse=False),
    "elsa-l-sparse-z": dict(optimizer="adam8bit", z_dtype="fp8_e4m3", u_dtype="bf16", z_sparse=True),
}


def build_model(args, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seqlen, 256),
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.train()


def build_optimizer(name: str, model: torch.nn.Module, args):
    base_kind, admm_settings = VARIANTS[name]
    params = list(model.parameters())
    if base_kind == "adam":
        base = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.95))
    else:
        import bitsandbytes as bnb

        base = bnb.optim.Adam8bit(params, lr=args.lr, betas=(0.9, 0.95))
    if admm_settings is None:
        return base
    targets = find_targets(model, args.sparsity)
    cfg = make_config(
        {
            "model": "tiny",
            "sparsity": args.sparsity,
            "steps": 10**9,
            "lr": args.lr,
            "lmda": args.lmda,
            "interval": args.interval,
            "projection": "fisher",
            "penalty": "coupled",
            "init": "none",
            **admm_settings,
        }
    )
    settings = ADMMSettings.from_config(cfg)
    return ADMM(base, targets, settings)


def one_step(model, optimizer, batch) -> tuple[float, float]:
    """(whole step seconds, optimiser step seconds)."""
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    before_step = time.perf_counter()
    optimizer.step()
    done = time.perf_counter()
    return done - started, done - before_step


def summarise(times: list[float]) -> dict:
    """Median, mean, and the mean without the slowest 10% (stalls of a shared machine)."""
    ordered = sorted(times)
    trimmed = ordered[: max(1, int(len(ordered) * 0.9))]
    return {
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "trimmed_mean_s": statistics.fmean(trimmed),
        "min_s": ordered[0],
        "n": len(times),
    }


def time_update_split(admm: ADMM, repeats: int) -> dict:
    """Seconds of one z/u-update (run after the measured steps: it changes the state)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        admm.update_split()
        times.append(time.perf_counter() - started)
    return {"median_s": statistics.median(times), "min_s": min(times)}


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of (variant step / base step) taken in the same round: load that comes
    and goes on a shared machine hits both sides of each ratio alike."""
    return statistics.median(x / y for x, y in zip(a, b))


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--interval", type=int, default=32)
    parser.add_argument("--steps", type=int, default=96, help="measured steps per variant (a multiple of --round)")
    parser.add_argument("--round", type=int, default=1, help="steps a variant runs before the next takes its turn")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lmda", type=float, default=2e-3)
    parser.add_argument("--zu-repeats", type=int, default=5, help="timed z/u-updates per ADMM variant, after the run")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: steadiest on a shared machine; 0 = torch's default)",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "overhead.json"))
    args = parser.parse_args()
    args = parser.parse_args()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    for name in names:
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        if name in BASE_OF and BASE_OF[name] not in names:
            parser.error(f"variant {name!r} needs its base {BASE_OF[name]!r} in --variants")
    return args, names


def _interleaved_runs(args, names: list[str]) -> dict:
    """Every variant on its own model, taking turns ``--round`` steps at a time (same load for all)."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(2, TINY_VOCAB_SIZE, (args.batch, args.seqlen), generator=g) for _ in range(16)]
    runs = {}
    for name in names:
        model = build_model(args)
        runs[name] = {"model": model, "opt": build_optimizer(name, model, args), "step": [], "opt_step": [], "k": 0}
    for name in names:  # warm-up (allocations, first z/u-update at ADMM step 1)
        run = runs[name]
        for _ in range(args.warmup):
            one_step(run["model"], run["opt"], batches[run["k"] % len(batches)])
            run["k"] += 1
    rounds = max(1, args.steps // args.round)
    for r in range(rounds):
        for name in names:
            run = runs[name]
            for _ in range(args.round):
                total, opt_only = one_step(run["model"], run["opt"], batches[run["k"] % len(batches)])
                run["k"] += 1
                run["step"].append(total)
                run["opt_step"].append(opt_only)
        if (r + 1) % max(1, rounds // 8) == 0:
            print(
                f"round {r + 1}/{rounds}: "
                + ", ".join(f"{n} {statistics.median(runs[n]['step']) * 1e3:.0f} ms" for n in names),
                flush=True,
            )

    return runs


def _timing(runs: dict, args, names: list[str]) -> dict:
    timing = {}
    for name in names:
        run = runs[name]
        entry = {"step": summarise(run["step"]), "optimizer_step": summarise(run["opt_step"])}
        if isinstance(run["opt"], ADMM):
            entry["zu_updates_measured"] = sum(
                1 for s in range(args.warmup + 1, run["k"] + 1) if (s - 1) % args.interval == 0
            )
            entry["zu_update"] = time_update_split(run["opt"], args.zu_repeats)
        timing[name] = entry
    return timing


def _overhead(runs: dict, timing: dict, args) -> dict:
    overhead = {}
    for name, base in BASE_OF.items():
        if name not in timing:
            continue
        a, b = timing[name], timing[base]
        # amortised cost: an x-update step plus one z/u-update every ``interval`` steps
        zu = a["zu_update"]
        overhead[name] = {
            "vs": base,
            "step_ratio_paired_median": paired_ratio(runs[name]["step"], runs[base]["step"]),
            "step_ratio_median": a["step"]["median_s"] / b["step"]["median_s"],
            "step_ratio_min": a["step"]["min_s"] / b["step"]["min_s"],
            "step_ratio_amortised_min": (a["step"]["min_s"] + zu["min_s"] / args.interval) / b["step"]["min_s"],
            "step_ratio_amortised_median": (a["step"]["median_s"] + zu["median_s"] / args.interval)
            / b["step"]["median_s"],
            "step_ratio_mean": a["step"]["mean_s"] / b["step"]["mean_s"],
            "zu_update_ms_min": zu["min_s"] * 1e3,
            "optimizer_step_extra_ms_min": (a["optimizer_step"]["min_s"] - b["optimizer_step"]["min_s"]) * 1e3,
            "optimizer_step_extra_ms_median": (a["optimizer_step"]["median_s"] - b["optimizer_step"]["median_s"]) * 1e3,
        }

    return overhead


def _memory(runs: dict, args) -> dict:
    memory = {}
    for name, case in MEMORY_CASES.items():
        entry = {"analytic": state_bytes_per_param(sparsity=args.sparsity, **case)}
        if name in runs:
            entry["measured"] = measured_state_bytes_per_param(runs[name]["opt"])
        memory[name] = entry

    return memory


def _print_report(runs: dict, names: list[str], timing: dict, overhead: dict, memory: dict, args) -> None:
    print(
        "\ntime per step, min / median / mean over", len(runs[names[0]]["step"]), "steps (optimiser step alone: min):"
    )
    for name in names:
        t = timing[name]
        zu = f"   z/u-update {t['zu_update']['min_s'] * 1e3:.1f} ms (min)" if "zu_update" in t else ""
        print(
            f"  {name:22s} {t['step']['min_s'] * 1e3:7.1f} / {t['step']['median_s'] * 1e3:7.1f} / "
            f"{t['step']['mean_s'] * 1e3:7.1f} ms   "
            f"optimiser {t['optimizer_step']['min_s'] * 1e3:6.2f} ms{zu}"
        )
    print(
        f"\noverhead of ADMM over its base optimiser (target < 1.05); amortised = step + z/u-update / {args.interval}:"
    )
    for name, o in overhead.items():
        print(
            f"  {name:22s} vs {o['vs']:9s} paired median x{o['step_ratio_paired_median']:.3f}, min "
            f"x{o['step_ratio_min']:.3f}, "
            f"amortised (min) x{o['step_ratio_amortised_min']:.3f}, median x{o['step_ratio_median']:.3f}; "
            f"optimiser step +{o['optimizer_step_extra_ms_min']:.2f} ms (min)"
        )
    print(
        f"\nbytes per pruned parameter at sparsity {args.sparsity} (m + v + z + u = states; total adds weight 4 + "
        "grad 4):"
    )
    for name, entry in memory.items():
        a = entry["analytic"]
        line = (
            f"  {name:18s} analytic m {a['m']:.3f} v {a['v']:.3f} z {a['z']:.3f} u {a['u']:.3f} -> states "
            f"{a['states']:.3f}, total {a['total']:.3f}"
        )
        if "measured" in entry:
            line += f"; measured states {entry['measured']['states']:.3f}"
        print(line)


def main() -> None:
    args, names = _parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    runs = _interleaved_runs(args, names)
    n_params = sum(p.numel() for p in runs[names[0]]["model"].parameters())
    n_pruned = sum(t.numel for t in find_targets(runs[names[0]]["model"], args.sparsity))
    print(
        f"model: {n_params / 1e6:.2f}M parameters, {n_pruned / 1e6:.2f}M pruned; batch {args.batch} x {args.seqlen}; "
        f"{torch.get_num_threads()} threads; interval {args.interval}",
        flush=True,
    )

    timing = _timing(runs, args, names)
    overhead, memory = _overhead(runs, timing, args), _memory(runs, args)
    _print_report(runs, names, timing, overhead, memory, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "settings": vars(args),
                "machine": {
                    "platform": platform.platform(),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "processor": platform.processor(),
                },
                "model": {"parameters": n_params, "pruned_parameters": n_pruned},
                "timing": timing,
                "overhead": overhead,
                "memory": memory,
            },
            indent=1,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
