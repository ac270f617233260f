"""Figures logged with a run (per-layer sparsity), and the line style every figure's series share."""

from __future__ import annotations

from pathlib import Path


def series_style(points: int) -> dict:
    """Plot arguments for a series of ``points`` points: a lone point gets a marker, because a line
    through one point draws nothing (a 32-step run validates once; its loss history was an empty axis)."""
    return {"marker": "o"} if points == 1 else {}


def plot_layer_sparsity(report: dict, out_png: str | Path) -> Path:
    """Bar chart of each pruned matrix's sparsity against its target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["matrices"]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.08), 3.5))
    ax.bar(range(len(rows)), [r["sparsity"] for r in rows], width=1.0, color="#4c72b0", label="achieved")
    targets = [r["target_sparsity"] for r in rows]
    ax.plot(range(len(rows)), targets, color="#c44e52", lw=1, label="target", **series_style(len(rows)))
    ax.set_xlabel("pruned matrix (model order)")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.set_title(f"per-matrix sparsity (overall {report['overall_sparsity']:.4f})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
