"""Evaluation as downstream Ray tasks: perplexity per dataset and lm-eval zero-shot, in parallel.

Each task loads the pruned checkpoint itself (so tasks can land on any node, each on a GPU
where there is one) and returns ``{metric: value}``. A failing task is reported, not fatal:
the checkpoint is already saved and logged when evaluation starts.
"""

from __future__ import annotations

import time

import ray

from elsa.config import EvalSettings

HEARTBEAT_S = 10.0  # the longest the terminal stays silent while evaluations run


@ray.remote
def perplexity_task(location: str, dataset: str, seqlen: int, max_windows: int | None, windows: str) -> dict:
    import torch

    from elsa.api import evaluate_perplexity
    from elsa.model_io.export import load_checkpoint
    from pipelines.run.storage import materialized

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the exported weights as shipped (dense or compressed, in their dtype); computed in that
    # dtype on a GPU, upcast to fp32 on a CPU (exact: every bf16 value is an fp32 value)
    with materialized(location) as checkpoint_dir:
        model, tokenizer = load_checkpoint(
            checkpoint_dir, dtype=None if device == "cuda" else torch.float32, device=device
        )
    return evaluate_perplexity(model, tokenizer, [dataset], seqlen, max_windows, windows)


@ray.remote
def zero_shot_task(location: str, tasks: list[str], limit: int | None, include_path: str | None = None) -> dict:
    import torch

    from pipelines.evals.zero_shot import accuracy_metrics, run_zero_shot
    from pipelines.run.storage import materialized

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with materialized(location) as checkpoint_dir:
        results = run_zero_shot(checkpoint_dir, tasks, limit=limit, device=device, include_path=include_path)
    return accuracy_metrics(results)


def _zero_shot_average(metrics: dict, tasks: list[str]) -> dict:
    """The paper's average column, once every task's accuracy is in (the tasks ran in groups)."""
    accuracies = [metrics.get(f"acc_{task}") for task in tasks]
    return {"zero_shot_avg": sum(accuracies) / len(accuracies)} if tasks and None not in accuracies else {}


def _cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_evaluation(location: str, settings: EvalSettings, use_gpu: bool = False, echo=None) -> tuple[dict, dict]:
    """Launch every evaluation at once; returns (metrics, errors by evaluation name).

    ``location``: the checkpoint's directory or storage URI, readable from any node. ``echo``
    (e.g. ``print``) gets one line per evaluation as it finishes, with its time and numbers.
    """
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    seqlen = settings.window()
    pending = {
        f"ppl_{name}": perplexity_task.options(**resources).remote(
            location, name, seqlen, settings.eval_max_windows, settings.windows
        )
        for name in settings.eval_datasets
    }
    # the zero-shot tasks in groups of about equal cost, one Ray task each: every CPU works
    from pipelines.evals.zero_shot import task_groups

    groups = task_groups(list(settings.lm_eval_tasks), 1 if use_gpu else _cpus())
    for group in groups:
        name = "zero_shot" if len(groups) == 1 else f"zero_shot[{','.join(group)}]"
        pending[name] = zero_shot_task.options(**resources).remote(
            location, group, settings.lm_eval_limit, settings.lm_eval_include
        )
    if settings.eval_speed:  # decode tokens/s and peak memory, sparse vs dense (CPU: the sparse path is CPU's)
        from pipelines.evals.speed import speed_task

        pending["decode_speed"] = speed_task.options(num_cpus=1).remote(location)
    metrics, errors = {}, {}
    names = {ref: name for name, ref in pending.items()}
    started, waiting = time.perf_counter(), list(pending.values())
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1, timeout=HEARTBEAT_S)
        if not done:  # a long evaluation (zero-shot: minutes) still says it is alive
            if echo is not None:
                still = ", ".join(names[ref] for ref in waiting)
                echo(f"  ... {time.perf_counter() - started:.0f} s, still running: {still}")
            continue
        name = names[done[0]]
        try:
            result = ray.get(done[0])
            metrics.update(result)
            said = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))
        except Exception as err:  # noqa: BLE001 - reported to the user and to MLflow
            errors[name] = f"{type(err).__name__}: {str(err).splitlines()[-1] if str(err) else ''}"
            said = "FAILED"
        if echo is not None:
            echo(
                f"  [{len(pending) - len(waiting)}/{len(pending)}] {name} done in "
                f"{time.perf_counter() - started:.0f} s: {said}"
            )
    return {**metrics, **_zero_shot_average(metrics, list(settings.lm_eval_tasks))}, errors
