"""Which exact top-k selection is fastest on an accelerator: the z-update's projection, alone.

Why: the GPU check of 2026-12-04 measured the z/u-update at 0.4-0.5 s per call on SmolLM2-135M
shapes (210 matrices), 3-4 Adam steps, most of it fixed cost per matrix (the radix select waits on
the host after each byte); and a kthvalue threshold, tried as a sync-free path, took 307 ms for one
4096 x 11008 matrix against the radix select's 6 ms. Each candidate here returns the same unique
mask (top ``keep`` bit patterns, lowest index first among ties) and is checked against the radix
select; the JSON has the median ms per matrix shape and level.

    python bench/topk_device.py [--device cuda] [--out bench/results/topk_device.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from elsa.optim.projection import _as_bits, _device_topk_mask, topk_mask, with_ties  # noqa: E402

SHAPES = [(576, 1536), (1536, 576), (2048, 8192), (4096, 11008)]
SPARSITIES = (0.7, 0.9)


def by_sort(bits, keep):
    return with_ties(bits, torch.sort(bits, descending=True).values[keep - 1], keep)


by_topk = _device_topk_mask  # the candidate elsa adopted


def by_topk_small(bits, keep):  # the smaller side: keep the top k, or drop the bottom n - k
    drop = bits.numel() - keep
    if keep <= drop:
        return by_topk(bits, keep)
    return with_ties(bits, torch.topk(bits, drop + 1, largest=False, sorted=False).values.max(), keep)


def by_kthvalue(bits, keep):
    return with_ties(bits, torch.kthvalue(bits, bits.numel() - keep + 1).values, keep)


def by_radix(bits, keep):  # elsa's select as committed (host waits per byte)
    return topk_mask(bits.view(torch.float32), keep)


CANDIDATES = {"radix": by_radix, "sort": by_sort, "topk": by_topk, "topk_small": by_topk_small}
CANDIDATES["kthvalue"] = by_kthvalue


def timed_ms(fn, device, reps=7) -> float:
    times = []
    for index in range(reps + 2):
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        if index >= 2:
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "topk_device.json")
    parser.add_argument("--shapes", default=None, help="e.g. 64x96,128x32 (default: the four bench shapes)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes else SHAPES
    rows = []
    for shape in shapes:
        generator = torch.Generator().manual_seed(0)
        score = torch.randn(*shape, generator=generator).abs().to(device)
        score[0, : shape[1] // 2] = score[0, 0]  # ties at a common value
        bits = _as_bits(score)
        for sparsity in SPARSITIES:
            keep = int(round((1 - sparsity) * score.numel()))
            reference = by_radix(bits, keep)
            row = {"shape": list(shape), "sparsity": sparsity, "keep": keep}
            for name, fn in CANDIDATES.items():
                try:
                    row[f"{name}_equal"] = bool(torch.equal(fn(bits, keep), reference))
                    row[f"{name}_ms"] = timed_ms(lambda fn=fn: fn(bits, keep), device)
                except Exception as error:  # noqa: BLE001 - recorded, the next candidate still runs
                    row[f"{name}_error"] = f"{type(error).__name__}: {error}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "rows": rows}
    report["torch"] = torch.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
