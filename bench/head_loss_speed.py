"""Seconds a training step: the model's own loss against the chunked frozen-head loss, or next-token
training against distillation.

Why: Gemma-3-270M's 262k-token vocabulary makes a micro-batch's logits the largest tensors of a
step; elsa/head_loss.py never materialises them. This prunes the same dense model four times in
one process (own, chunked, own, chunked: interleaved, so a drifting machine shows as a spread,
not as a gain), ``--steps`` steps each from a magnitude start (no one-shot warm start, so only
training is timed), and records every step's seconds, the training losses and the projected
held-out loss: the two paths should agree to bf16 rounding. ``--loss ntp+kd`` times distillation
from the dense teacher, whose logits the chunked path builds chunk by chunk too.

``--compare loss`` times next-token training against ``--loss`` (default ``ntp+kd``), both on the
chunked head and interleaved the same way: what a distillation step costs over the rule's own, the
figure that decides whether distillation pays at equal wall time. ``--interval`` sets the z/u-update
interval of both (unset: the rule's at ``--steps``; a long run's is 4).

    python bench/head_loss_speed.py --model gemma3-270m --steps 8 [--loss ntp+kd]
    python bench/head_loss_speed.py --model smollm2-135m --steps 16 --compare loss --interval 4
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


def variants(args) -> list[tuple[str, bool, str]]:
    """(label, chunked head, loss) of the two settings ``--compare`` sets against each other."""
    if args.compare == "head":
        return [("model's own", False, args.loss), ("chunked head", True, args.loss)]
    return [("ntp", True, "ntp"), (args.loss, True, args.loss)]  # main() made --loss a distilling one


def one_run(dense, tokenizer, args, variant: tuple[str, bool, str]) -> dict:
    """A prune of a copy of ``dense``: the chunked head loss on or off, with the variant's loss."""
    label, chunked, loss = variant
    real = distill.fused_head_applies
    distill.fused_head_applies = real if chunked else (lambda model: False)
    try:
        steps = {"steps": args.steps, "log_interval": 1, "eval_interval": args.steps}
        if args.interval:
            steps["interval"] = args.interval
        cfg = PruneConfig(model=args.model, sparsity=args.sparsity, init="none", loss=loss, **steps)
        started = time.perf_counter()
        result = prune_model(cfg, model=copy.deepcopy(dense), tokenizer=tokenizer)
        wall = time.perf_counter() - started
    finally:
        distill.fused_head_applies = real
    history = result.summary["history"]
    tokens = cfg.batch_size * cfg.seqlen * cfg.grad_accum
    return {
        "variant": label,
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
    parser.add_argument("--compare", choices=["head", "loss"], default="head")
    parser.add_argument("--interval", type=int, default=None, help="z/u-update interval (unset: the rule's)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    if args.compare == "loss" and args.loss == "ntp":
        args.loss = "ntp+kd"
    dense, tokenizer = load_model(args.model), load_tokenizer(args.model)
    pair = variants(args)
    runs = []
    for variant in pair + pair:
        runs.append(one_run(dense, tokenizer, args, variant))
        print(json.dumps(runs[-1]), flush=True)
    labels = [label for label, _, _ in pair]
    seconds = {label: [s for r in runs if r["variant"] == label for s in r["s_per_step"]] for label in labels}
    median = {label: statistics.median(values) for label, values in seconds.items()}
    command = "python " + " ".join(sys.argv)
    record = {"command": command, "machine": machine(), "median_s_per_step": median, "runs": runs}
    kind = "head-loss" if args.compare == "head" else "loss"
    out = Path(args.out) / f"{kind}-speed-{Path(args.model).name}{suffix(args)}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    (first, a), (second, b) = median.items()
    print(f"median s a step: {first} {a:.2f}, {second} {b:.2f} ({b / a:.2f}x) -> {out}")


def suffix(args) -> str:
    """The output name's tail: the loss timed (head comparisons of ntp have none, as before)."""
    tail = "" if args.loss == "ntp" else "-" + args.loss.replace("+", "-")
    return tail + (f"-interval{args.interval}" if args.interval else "")


if __name__ == "__main__":
    main()
