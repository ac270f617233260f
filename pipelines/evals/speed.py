"""Decode speed of an export as one more downstream Ray evaluation task, and ``elsa generate``.

Why: pruning to 70-90% is for a model that answers faster in less memory; this measures it
where the other evaluations run. The task times batch-1 greedy decoding (transformers'
``generate``, a 64-token prompt from the bundled Wikipedia sample, :data:`NEW_TOKENS` new
tokens) of the compressed export read sparse (:mod:`elsa.model_io.sparse_infer`) and of the same weights
densified, in the export's dtype. Each model runs in a subprocess of its own, so its peak
resident memory (VmHWM) is its own; the two take turns :data:`REPEATS` times and the medians are
reported. The task holds one CPU and runs beside the other evaluations, so its tokens/s are those
of a shared machine: the ratio, not the absolute figure, is what to read
(``bench/decode_speed.py`` measures alone).
"""

from __future__ import annotations

import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import ray

NEW_TOKENS = 128
PROMPT_TOKENS = 64
REPEATS = 2


def _prompt_ids(tokenizer) -> list[int]:
    """The first :data:`PROMPT_TOKENS` tokens of the bundled Wikipedia sample."""
    from elsa.tiny import CORPORA

    with gzip.open(CORPORA / "enwiki-sample.txt.gz", "rt", encoding="utf-8") as handle:
        text = handle.read(4000)
    return tokenizer(text)["input_ids"][:PROMPT_TOKENS]


def _peak_rss_mb() -> float:
    """VmHWM (exec resets it; ``ru_maxrss`` would carry the forking Ray worker's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load_for_decoding(checkpoint_dir: str, sparse: bool):
    """``(model, tokenizer)``: sparse from a compressed export, else densified, in the export's dtype."""
    from elsa.model_io.export import load_checkpoint
    from elsa.model_io.models import load_tokenizer
    from elsa.model_io.sparse_infer import load_sparse_for_inference

    if sparse:
        return load_sparse_for_inference(checkpoint_dir), load_tokenizer(checkpoint_dir)
    return load_checkpoint(checkpoint_dir, dtype=None)


def decode_once(checkpoint_dir: str, sparse: bool, new_tokens: int) -> dict:
    """Load one model, warm it up, time one greedy ``generate``; the body of the subprocess."""
    import torch

    model, tokenizer = load_for_decoding(checkpoint_dir, sparse)
    ids = torch.tensor([_prompt_ids(tokenizer)])
    settings = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **settings)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
        seconds = time.perf_counter() - start
    return {"tokens_per_s": new_tokens / seconds, "peak_rss_mb": _peak_rss_mb(), "tokens": out[0].tolist()}


def _measure(checkpoint_dir: str, sparse: bool, new_tokens: int, threads: int) -> dict:
    """:func:`decode_once` in a fresh interpreter with ``threads`` threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    spec = json.dumps({"dir": checkpoint_dir, "sparse": sparse, "new_tokens": new_tokens})
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.evals.speed", spec], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"decoding {'sparse' if sparse else 'dense'} failed: {tail[0]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def decode_speed(checkpoint_dir: str, new_tokens: int = NEW_TOKENS, repeats: int = REPEATS, threads: int = 1) -> dict:
    """``speed_*`` metrics: tokens/s and peak RSS (MB) of sparse and dense, their ratios, same tokens.

    A dense export has no sparse form: only its dense figures are returned.
    """
    from elsa.model_io.sparse_format import is_sparse_checkpoint

    kinds = ["sparse", "dense"] if is_sparse_checkpoint(checkpoint_dir) else ["dense"]
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for _ in range(repeats):
        for kind in kinds:
            runs[kind].append(_measure(checkpoint_dir, kind == "sparse", new_tokens, threads))
    metrics = {}
    for kind, rows in runs.items():
        metrics[f"speed_{kind}_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in rows)
        metrics[f"speed_{kind}_peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in rows)
    if "sparse" in runs:
        metrics["speed_sparse_over_dense"] = metrics["speed_sparse_tokens_per_s"] / metrics["speed_dense_tokens_per_s"]
        metrics["speed_rss_sparse_over_dense"] = (
            metrics["speed_sparse_peak_rss_mb"] / metrics["speed_dense_peak_rss_mb"]
        )
        metrics["speed_same_tokens"] = float(runs["sparse"][0]["tokens"] == runs["dense"][0]["tokens"])
    return metrics


@ray.remote
def speed_task(location: str) -> dict:
    """The Ray task of :func:`pipelines.evals.evaluation.run_evaluation` (``eval_speed``)."""
    from pipelines.run.storage import materialized

    with materialized(location) as checkpoint_dir:
        return decode_speed(checkpoint_dir)


def complete(checkpoint_dir: str, prompt: str, max_new_tokens: int) -> str:
    """The greedy completion of ``prompt`` by the export, read sparse where it is compressed."""
    import torch

    from elsa.model_io.sparse_format import is_sparse_checkpoint

    model, tokenizer = load_for_decoding(checkpoint_dir, is_sparse_checkpoint(checkpoint_dir))
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def generate_command(args) -> str:
    """``elsa generate``: the completion of ``--prompt`` by ``--run`` (a directory or an MLflow run id)."""
    import tempfile

    from pipelines.evals.reevaluate import _checkpoint_from_run
    from pipelines.records import tracking

    if Path(args.run).is_dir():
        return complete(str(Path(args.run).resolve()), args.prompt, args.max_new_tokens)
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_reachable(uri)
    with tempfile.TemporaryDirectory() as scratch:
        return complete(_checkpoint_from_run(uri, args.run, Path(scratch)), args.prompt, args.max_new_tokens)


if __name__ == "__main__":
    _spec = json.loads(sys.argv[1])
    print(json.dumps(decode_once(_spec["dir"], _spec["sparse"], _spec["new_tokens"])))
