"""The CPU projection against an earlier commit's: the z-update's top-k on a real model's matrices.

Why: on two CPU cores the z/u-update of SmolLM2-135M (210 matrices, 106M weights) cost about 1.3 s,
most of it the radix select's passes. This times ``topk_mask`` as it is now and as it was at
``--base`` (read from git, not copied), side by side in one process on the same scores, and
checks the masks are identical. Scores are the real dense model's |w| (dequantised weights: many
ties) and |w|^2 times a random positive v (the objective-aware score's shape), at the sparsities
of the bench.

    python bench/projection_speed.py [--model smollm2-135m] [--base dadd67c~1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from elsa.optim.projection import topk_mask  # noqa: E402


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout


def projection_at(commit: str):
    """``elsa/optim/projection.py`` as of ``commit``, imported as a module of its own."""
    source = _git("show", f"{commit}:elsa/optim/projection.py")
    path = Path(tempfile.mkdtemp()) / "projection_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("projection_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pass_seconds(fn, scores: list[tuple[torch.Tensor, int]]) -> float:
    started = time.perf_counter()
    for score, keep in scores:
        fn(score, keep)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--base", default="dadd67c~1", help="the commit to compare against")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.7, 0.9])
    parser.add_argument("--repeats", type=int, default=3, help="passes over all matrices; the fastest counts")
    parser.add_argument("--out", default="bench/results/projection_speed.json")
    args = parser.parse_args(argv)

    from elsa.config import PruneConfig
    from elsa.model_io.models import load_model
    from elsa.targets import config_targets

    base = projection_at(args.base)
    model = load_model(args.model)
    weights = [t.param.detach().float() for t in config_targets(model, PruneConfig(model=args.model, sparsity=0.5))]
    generator = torch.Generator().manual_seed(0)
    kinds = {
        "magnitude": [w.abs() for w in weights],
        "fisher": [torch.rand(w.shape, generator=generator) * w * w for w in weights],
    }
    rows = []
    for kind, scores in kinds.items():
        for sparsity in args.sparsities:
            cases = [(s, round(s.numel() * (1 - sparsity))) for s in scores]
            for score, keep in cases:
                if not torch.equal(topk_mask(score, keep), base.topk_mask(score, keep)):
                    raise SystemExit(f"masks differ ({kind}, sparsity {sparsity}, shape {tuple(score.shape)})")
            now = min(pass_seconds(topk_mask, cases) for _ in range(args.repeats))
            before = min(pass_seconds(base.topk_mask, cases) for _ in range(args.repeats))
            rows.append(
                {"score": kind, "sparsity": sparsity, "before_s": before, "now_s": now, "speedup": before / now}
            )
            print(
                f"{kind:9s} {sparsity:.1f}: {before:.3f} s -> {now:.3f} s, {len(cases)} matrices ({before / now:.1f}x)"
            )
    record = {
        "command": "python " + " ".join([Path(__file__).relative_to(REPO).as_posix(), *(argv or sys.argv[1:])]),
        "model": args.model,
        "base": _git("rev-parse", "--short", args.base).strip(),
        "now": _git("rev-parse", "--short", "HEAD").strip(),
        "matrices": len(weights),
        "weights": sum(w.numel() for w in weights),
        "torch_threads": torch.get_num_threads(),
        "masks_identical": True,
        "rows": rows,
    }
    Path(REPO / args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
