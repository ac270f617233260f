"""What ``elsa prune`` prints at the end: the numbers of the run and where everything went."""

from __future__ import annotations


def kept_text(metrics: dict) -> str:
    """Which solution a warm-started run kept, and the held-out losses that decided it."""
    start, final = metrics.get("init_val_loss", float("nan")), metrics.get("final_val_loss_projected", float("nan"))
    if metrics.get("kept_init"):
        return f"the one-shot start (held-out loss {start:.4f} beat ELSA's final projection, {final:.4f})"
    return f"ELSA's final projection (held-out loss {final:.4f}; the one-shot start had {start:.4f})"


def summary_table(result) -> str:
    """What the user reads at the end (``result``: a :class:`pipelines.run.job.JobResult`)."""
    lines = [f"run id      {result.run_id}", f"checkpoint  {result.checkpoint_dir}"]
    if result.export:
        size = result.export.get("weights_bytes", 0) / 1e6
        lines.append(
            f"export      {result.export.get('format')}, {result.export.get('dtype')}, {size:.1f} MB of weights"
        )
    if result.export.get("registered"):
        lines.append(f"registered  {result.export['registered']}")
    lines.append(f"wall time   {result.wall_s:.1f} s")
    if "kept_init" in result.metrics:
        lines.append(f"kept        {kept_text(result.metrics)}")
    for key in sorted(k for k in result.metrics if k != "step"):  # step: Ray Train's report index
        value = result.metrics[key]
        lines.append(f"{key:<28}{value:.6g}" if isinstance(value, float) else f"{key:<28}{value}")
    for key, error in result.eval_errors.items():
        lines.append(f"{key:<28}FAILED: {error}")
    if result.queued:
        lines.append(result.queued)
    return "\n".join(lines)
