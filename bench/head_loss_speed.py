"""Seconds a training step with the model's own loss against the chunked frozen-head loss.

Why: Gemma-3-270M's 262k-token vocabulary makes a micro-batch's logits the largest tensors of a
step; elsa/head_loss.py never materialises them. This prunes the same dense model four times in
one process (own, chunked, own, chunked: interleaved, so a drifting machine shows as a spread,
not as a gain), ``--steps`` steps each from a magnitude start (no one-shot warm start, so only
training is timed), and records every step's seconds, the training losses and the projected
held-out loss: the two paths should agree to bf16 rounding. ``--loss ntp+kd`` times distillation
from the dense teacher, whose logits the chunked path builds chunk by chunk too.

    python bench/head_loss_speed.py --model gemma3-270m --steps 8 [--loss ntp+kd]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import elsa.distill as distill  # noqa: E402
from elsa.api import prune_model  # noqa: E402
from elsa.config import PruneConfig  # noqa: E402
from elsa.model_io.models import load_model, load_tokenizer  # noqa: E402
from elsa.provenance import machine  # noqa: E402


def one_run(dense, tokenizer, args, chunked: bool) -> dict:
    """A prune of a copy of ``dense`` with the chunked head loss on or off."""
    real = distill.fused_head_applies
    distill.fused_head_applies = real if chunked else (lambda model: False)
    try:
        steps = {"steps": args.steps, "log_interval": 1, "eval_interval": args.steps}
        cfg = PruneConfig(model=args.model, sparsity=args.sparsity, init="none", loss=args.loss, **steps)
        started = time.perf_counter()
        result = prune_model(cfg, model=copy.deepcopy(dense), tokenizer=tokenizer)
        wall = time.perf_counter() - started
    finally:
        distill.fused_head_applies = real
    history = result.summary["history"]
    tokens = cfg.batch_size * cfg.seqlen * cfg.grad_accum
    return {
        "loss": "chunked head" if chunked else "model's own",
        "wall_s": round(wall, 1),
        "s_per_step": [round(tokens / h["tokens_per_s"], 2) for h in history],
        "train_loss": [round(h["train_loss"], 4) for h in history],
        "val_loss_projected": [h["val_loss_projected"] for h in history if "val_loss_projected" in h],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--loss", choices=["ntp", "ntp+kd", "kd"], default="ntp")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    dense, tokenizer = load_model(args.model), load_tokenizer(args.model)
    runs = []
    for chunked in (False, True, False, True):
        runs.append(one_run(dense, tokenizer, args, chunked))
        print(json.dumps(runs[-1]), flush=True)
    median = {
        kind: statistics.median(s for r in runs if r["loss"] == kind for s in r["s_per_step"])
        for kind in ("model's own", "chunked head")
    }
    command = "python " + " ".join(sys.argv)
    record = {"command": command, "machine": machine(), "median_s_per_step": median, "runs": runs}
    suffix = "" if args.loss == "ntp" else "-" + args.loss.replace("+", "-")
    out = Path(args.out) / f"head-loss-speed-{Path(args.model).name}{suffix}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    own, chunked = median["model's own"], median["chunked head"]
    print(f"median s a step: own {own:.2f}, chunked {chunked:.2f} -> {out}")


if __name__ == "__main__":
    main()
