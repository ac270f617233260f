"""Matrix-vector products of one pruned matrix, each sparse layout against dense bf16 ``F.linear``.

The table behind ``elsa.model_io.sparse_infer.PAYS_FROM`` (from which sparsity on a sparse layout
is faster than dense, by threads and size): time ratio sparse / dense bf16 for the CSR layout
(MKL, int32 columns, fp32 values) and the compact one (our kernel, int16 columns, bf16 values),
batch 1, interleaved rounds, medians. Writes ``bench/results/decode_speed.kernels.json``.

    python bench/decode_kernels.py --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from decode_speed import RESULTS, _machine, magnitude_prune_


def kernel_ratios(rows: int, cols: int, sparsity: float, rounds: int = 7, reps: int = 20) -> dict[str, float]:
    """Median time of each sparse layout's matrix-vector product over dense bf16 ``F.linear``'s, interleaved."""
    from elsa.model_io.compact_linear import CompactLinear, compact_from_csr
    from elsa.model_io.sparse_format import compress
    from elsa.model_io.sparse_infer import SparseLinear, csr_from_export

    weight = magnitude_prune_(torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)), sparsity)
    weight = weight.bfloat16()
    stored, _ = compress({"w": weight})
    csr = csr_from_export(stored["w.bitmask"], stored["w.values"], weight.shape)
    layouts = {"csr": SparseLinear(*csr, weight.shape), "compact": CompactLinear(*compact_from_csr(*csr), weight.shape)}
    x = torch.randn(1, 1, cols).bfloat16()
    calls = {"dense": lambda: torch.nn.functional.linear(x, weight)}
    calls.update({name: (lambda module=module: module(x)) for name, module in layouts.items()})
    times: dict[str, list[float]] = {name: [] for name in calls}
    for name, call in calls.items():
        call()
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(reps):
                call()
            times[name].append((time.perf_counter() - start) / reps)
    dense = statistics.median(times["dense"])
    return {name: statistics.median(times[name]) / dense for name in layouts}


def kernels(threads_list: list[int]) -> None:
    """The table behind elsa.model_io.sparse_infer.PAYS_FROM: time ratio sparse/dense bf16 per shape, level, threads."""
    shapes = [(576, 576), (1536, 576), (576, 1536), (2048, 2048), (5632, 2048), (2048, 5632)]
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for shape in shapes:
            for level in (0.5, 0.6, 0.7, 0.8, 0.9):
                ratios = kernel_ratios(*shape, level)
                rows.append({"threads": threads, "shape": shape, "sparsity": level})
                rows[-1].update({f"time_ratio_{name}": round(ratio, 3) for name, ratio in ratios.items()})
                rows[-1]["loadavg_1m"] = round(os.getloadavg()[0], 2)
                print(json.dumps(rows[-1]), flush=True)
    out = {"machine": _machine(), "command": " ".join(["python", *sys.argv]), "rows": rows}
    (RESULTS / "decode_speed.kernels.json").write_text(json.dumps(out, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    kernels(parser.parse_args().threads)


if __name__ == "__main__":
    main()
