"""OWL's block outlier ratios and the levels they give, per model: what the allocation sees.

Why: OWL's levels were chosen on SmolLM2-135M, where they help; on Gemma-3-270M they cost a
little (bench/results/NOTES.md, 2026-12-04 evening). The ratios show how the two differ.

    python bench/owl_ratios.py --models smollm2-135m gemma3-270m --sparsity 0.8
"""

from __future__ import annotations

import argparse
import json

import torch

from elsa.allocation import block_outlier_ratios, input_norms, owl_block_sparsities
from elsa.budget import owl_lambda
from elsa.config import make_config
from elsa.model_io.models import load_model, load_tokenizer
from elsa.targets import config_targets
from elsa.text.data import calibration_blocks


def owl_ratios(name: str, sparsity: float) -> dict:
    cfg = make_config({"model": name, "sparsity": sparsity})
    model, tokenizer = load_model(name), load_tokenizer(name)
    targets = config_targets(model, cfg)
    calib = calibration_blocks(tokenizer, cfg.data, cfg.calib_blocks, cfg.seqlen, cfg.seed, windows=cfg.windows)
    ratios = block_outlier_ratios(model, targets, input_norms(model, targets, calib), cfg.owl_m)
    levels = owl_block_sparsities(ratios, sparsity, owl_lambda(sparsity))
    return {"model": name, "sparsity": sparsity, "ratios": [round(r, 5) for r in ratios], "levels": levels}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"])
    parser.add_argument("--sparsity", type=float, default=0.8)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    for name in args.models:
        print(json.dumps(owl_ratios(name, args.sparsity)), flush=True)


if __name__ == "__main__":
    main()
