"""Figures for ``blockprune report``: mask heatmaps and the per-stage metric plot.

Kept apart from ``report.py`` so the Markdown logic stays testable without reading pixels and
matplotlib (Agg backend, imported lazily) is only touched when a figure is drawn.

Why two mask figures: layers differ in shape (384x384 projections, 1536x384 FFN), so one
matrix image cannot show them side by side. ``band_heatmap`` gives one row per layer and a
fixed number of columns, each the kept fraction of a band of output features, which lines
layers up and shows dead neurons/heads as dark stripes; ``mask_grid`` shows each layer's own
2-D map, downsampled to a few dozen cells per side, for the block pattern itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def downsample(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Mean of ``mask`` over a ``rows x cols`` grid of nearly equal bins (no bin is empty:
    the grid is clipped to the matrix size)."""
    m = np.asarray(mask, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"expected a non-empty 2-D mask, got shape {m.shape}")
    rows, cols = max(1, min(rows, m.shape[0])), max(1, min(cols, m.shape[1]))
    r_edges = np.linspace(0, m.shape[0], rows + 1).astype(int)
    c_edges = np.linspace(0, m.shape[1], cols + 1).astype(int)
    sums = np.add.reduceat(np.add.reduceat(m, r_edges[:-1], axis=0), c_edges[:-1], axis=1)
    counts = np.outer(np.diff(r_edges), np.diff(c_edges))
    return sums / counts


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def band_heatmap(masks: Sequence[np.ndarray], labels: Sequence[str], path: Path, bands: int = 64) -> Path:
    """Rows = layers, columns = ``bands`` bands of output features (W[out, in] rows), colour =
    kept fraction; a right-hand column gives each layer's overall density."""
    plt = _plt()
    grid = np.full((len(masks), bands), np.nan)
    dens = np.zeros(len(masks))
    for i, m in enumerate(masks):
        per_row = np.asarray(m, dtype=np.float64).mean(axis=1)[:, None]
        d = downsample(per_row, bands, 1)[:, 0]
        grid[i, : len(d)] = d
        dens[i] = float(np.mean(m))
    height = max(2.5, 0.22 * len(masks) + 1.2)
    fig, (ax, axd) = plt.subplots(1, 2, figsize=(10, height), gridspec_kw={"width_ratios": [12, 1]}, sharey=True)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel(f"output-feature band (each ~1/{bands} of W's rows)")
    ax.set_title("kept fraction per band of output features")
    axd.imshow(dens[:, None], aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for i, d in enumerate(dens):
        axd.text(0, i, f"{d:.2f}", ha="center", va="center", fontsize=6, color="w" if d < 0.6 else "k")
    axd.set_xticks([])
    axd.set_title("density", fontsize=8)
    fig.colorbar(im, ax=[ax, axd], fraction=0.03, pad=0.02, label="kept")
    _save(fig, path)
    return path


def mask_grid(cells: dict[tuple[str, str], np.ndarray], row_names: Sequence[str], col_names: Sequence[str],
              path: Path, size: int = 48) -> Path:
    """Small multiples: one downsampled W[out, in] keep map per (row, column) cell, e.g. encoder
    layer x role; missing cells are left blank."""
    plt = _plt()
    nr, nc = max(1, len(row_names)), max(1, len(col_names))
    fig, axes = plt.subplots(nr, nc, figsize=(1.5 * nc + 0.8, 1.5 * nr + 0.6), squeeze=False)
    for i, r in enumerate(row_names):
        for j, c in enumerate(col_names):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            m = cells.get((r, c))
            if m is None:
                ax.axis("off")
                continue
            ax.imshow(downsample(m, size, size), cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                      aspect="auto")
            if i == 0:
                ax.set_title(c, fontsize=8)
            if j == 0:
                ax.set_ylabel(r, fontsize=8)
    fig.suptitle("keep maps (W[out, in], downsampled; bright = kept)", fontsize=9)
    _save(fig, path)
    return path


def stage_plot(stages: Sequence[str], metrics: Sequence[float], metric_name: str, path: Path) -> Path:
    """Dev metric after each stage (initial -> dense -> reweighted -> retrain)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(range(len(stages)), [100 * m for m in metrics], marker="o")
    ax.set_xticks(range(len(stages)))
    ax.set_xticklabels(stages)
    ax.set_ylabel(f"dev {metric_name} (points)")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return path


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
