"""Figures logged with a run: per-layer sparsity."""

from __future__ import annotations

from pathlib import Path


def plot_layer_sparsity(report: dict, out_png: str | Path) -> Path:
    """Bar chart of each pruned matrix's sparsity against its target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["matrices"]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.08), 3.5))
    ax.bar(range(len(rows)), [r["sparsity"] for r in rows], width=1.0, color="#4c72b0", label="achieved")
    ax.plot(range(len(rows)), [r["target_sparsity"] for r in rows], color="#c44e52", lw=1, label="target")
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
