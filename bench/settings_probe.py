"""One probe of ELSA's settings: train from a saved start, print the held-out and WikiText-2 figures.

The budget rule (elsa/budget.py) was chosen with this script: each probe loads SmolLM2-135M,
optionally replaces its weights by a saved one-shot solution (so that one SparseGPT pass serves
many probes), runs ELSA's single-process loop with the given config fields and prints one JSON
line: the projected model's loss on held-out calibration blocks before and after (the figure
that decides), WikiText-2 perplexity (for the record only), wall and step time, peak memory.

    python bench/settings_probe.py --save-start sparsegpt --cfg '{"sparsity": 0.8}' --start /tmp/sgpt-80.safetensors
    python bench/settings_probe.py --start /tmp/sgpt-80.safetensors --cfg '{"steps": 32, "lr": 6e-4, "interval": 2}'
    python bench/settings_probe.py --start /tmp/sgpt-80.safetensors --cfg '{"steps": 150}' --long-val 512
    python bench/settings_probe.py --save-start sparsegpt --cfg '{"sparsity": 0.8, "allocation": "owl"}' \
        --start /tmp/owl-80.safetensors
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def _save_start(args, fields: dict) -> dict:
    """Run the one-shot method ``--save-start`` and save its weights to ``--start``."""
    from safetensors.torch import save_file

    from elsa.api import prune_model
    from elsa.config import make_config
    from elsa.loop import BatchSampler
    from elsa.model_io.models import load_model, load_tokenizer
    from elsa.perplexity import mean_nll

    cfg = make_config({**fields, "method": args.save_start})
    model, tokenizer = load_model(cfg.model), load_tokenizer(cfg.model)
    started = time.perf_counter()
    prune_model(cfg, model=model, tokenizer=tokenizer)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))  # lm_head shares the embedding
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not (tied and "lm_head" in k)}, args.start)
    record = {
        "saved": args.start,
        "method": args.save_start,
        "wall_s": time.perf_counter() - started,
        "val_loss": mean_nll(model, BatchSampler(tokenizer, cfg).validation()),
    }
    print(json.dumps(record))
    return record


def _nll_by_position(model, blocks: torch.Tensor, split: int) -> tuple[float, float]:
    """Mean next-token NLL of the predictions at positions < ``split`` and at positions >= ``split``:
    whether a model trained on ``split``-token blocks got worse beyond the length it was trained on."""
    import torch.nn.functional as F

    sums, counts = [0.0, 0.0], [0, 0]
    model.eval()
    with torch.no_grad():
        for block in blocks:
            logits = model(input_ids=block[None]).logits[0, :-1].float()
            nll = F.cross_entropy(logits, block[1:], reduction="none")
            for half, part in enumerate((nll[: split - 1], nll[split - 1 :])):
                sums[half] += float(part.double().sum())
                counts[half] += part.numel()
    model.train()
    return sums[0] / counts[0], sums[1] / max(counts[1], 1)


PPL_TEXTS = ("wikitext2-bundled", "sotu")  # the calibration's domain, and another


def _perplexities(ppl: dict) -> dict:
    """``ppl`` (WikiText-2, the figure earlier probes recorded) and every text's, by name."""
    return {"ppl": ppl["ppl_wikitext2-bundled"], "ppl_by_text": {t: ppl[f"ppl_{t}"] for t in PPL_TEXTS}}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cfg", default="{}", help="PruneConfig fields as JSON (sparsity 0.8, val_blocks 8 by default)"
    )
    parser.add_argument("--start", help="safetensors of the starting weights (written by --save-start)")
    parser.add_argument("--save-start", help="run this one-shot method, save its weights to --start, and stop")
    parser.add_argument("--tag", default="")
    parser.add_argument("--no-ppl", action="store_true", help="skip the perplexities (WikiText-2, sotu)")
    parser.add_argument(
        "--freeze-embeddings", action="store_true", help="keep the (tied) embedding matrix at its start value"
    )
    parser.add_argument(
        "--long-val",
        type=int,
        default=0,
        metavar="N",
        help="also measure held-out N-token blocks: NLL of the first and the second half (before / after)",
    )
    return parser.parse_args(argv)


def _load_start(model, path: str, cfg) -> None:
    """Replace the model's weights by the saved start (a tied lm_head may be missing)."""
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    if unexpected or any("lm_head" not in name for name in missing):
        raise SystemExit(f"{path} does not fit {cfg.model}: missing {missing[:3]}, unexpected {unexpected[:3]}")


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)

    from elsa.api import evaluate_perplexity
    from elsa.config import make_config
    from elsa.loop import BatchSampler
    from elsa.methods import get_method
    from elsa.model_io.models import load_model, load_tokenizer
    from elsa.perplexity import mean_nll
    from elsa.text.data import calibration_blocks
    from elsa.weight_scale import resolve_on_dense

    fields = {"sparsity": 0.8, "val_blocks": 8, "init": "none", **json.loads(args.cfg)}
    torch.manual_seed(0)
    if args.save_start:
        return _save_start(args, fields)
    cfg = make_config(fields)
    model, tokenizer = load_model(cfg.model), load_tokenizer(cfg.model)
    cfg, _ = resolve_on_dense(model, tokenizer, cfg)  # allocation and lr on the dense model, as a run does
    if args.start:
        _load_start(model, args.start, cfg)
    val = BatchSampler(tokenizer, cfg).validation()
    start_loss = mean_nll(model, val) if args.start else None
    long_val, long_record = None, {}
    if args.long_val:
        long_val = calibration_blocks(tokenizer, cfg.data, cfg.val_blocks, args.long_val, 7, split="validation")
        long_record = {"start": _nll_by_position(model, long_val, args.long_val // 2)}
    if args.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    started = time.perf_counter()
    summary = get_method("elsa").run(model, tokenizer, cfg, None, None)
    wall = time.perf_counter() - started
    history = summary.pop("history")
    if long_val is not None:
        long_record["final"] = _nll_by_position(model, long_val, args.long_val // 2)
    record = {
        "tag": args.tag,
        "start": args.start,
        "cfg": json.loads(args.cfg),
        "freeze_embeddings": args.freeze_embeddings,
        "init_val": start_loss,
        "final_val": mean_nll(model, val),
        **({f"long_val_{args.long_val}": long_record} if long_record else {}),
        **({} if args.no_ppl else _perplexities(evaluate_perplexity(model, tokenizer, list(PPL_TEXTS), 512, 32))),
        "wall_s": wall,
        "s_per_step": wall / cfg.steps,
        "threads": torch.get_num_threads(),
        "val_curve": [(h["step"], h["val_loss_projected"]) for h in history if "val_loss_projected" in h],
        "resid": [h["primal_residual"] for h in history if "primal_residual" in h],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "summary": summary,
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
