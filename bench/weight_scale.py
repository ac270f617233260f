"""The scale of the weights ELSA trains: median RMS of the pruned matrices, per model.

Why: under Adam a weight moves by about lr a step whatever its size, so an lr chosen on one model
moves another model's weights further or less far relative to their size. SmolLM2-135M and
Gemma-3-270M differ by 4.8x here (bench/results/NOTES.md, 2026-12-04 later).

    python bench/weight_scale.py --models smollm2-135m gemma3-270m
"""

from __future__ import annotations

import argparse
import json
import statistics
import torch

from elsa.budget import scaled_lr
from elsa.config import make_config
from elsa.model_io.models import load_model
from elsa.targets import config_targets
from elsa.weight_scale import weight_rms


def weight_scale(name: str) -> dict:
    """Median, min and max over the target matrices of each one's RMS."""
    model = load_model(name)
    targets = config_targets(model, make_config({"model": name, "sparsity": 0.8}))
    rms = weight_rms(targets)
    median = statistics.median(rms)  # elsa.weight_scale.median_weight_rms, from the same list
    return {
        "model": name,
        "matrices": len(rms),
        "rms_median": median,
        "rms_min": min(rms),
        "rms_max": max(rms),
        "lr": scaled_lr(median),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"])
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    for name in args.models:
        print(json.dumps(weight_scale(name)))


if __name__ == "__main__":
    main()
