"""The picture of an inspection: heat maps of ||dW|| / ||W|| and of bf16 survival over (layer, weight) per expert.

matplotlib is an optional extra (`pip install 'openpi-merge-plugin[plot]'`); it is imported only here.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from openpi_merge_plugin.checks.inspection import Inspection
from openpi_merge_plugin.checks.inspection import WeightStats
from openpi_merge_plugin.errors import MergeError

# Fixed size, whatever the checkpoint: 1400 x 900 pixels.
FIGSIZE = (14.0, 9.0)
DPI = 100
# Cells get their value written in them up to this many layers; the full-size models' 18 would not fit.
_ANNOTATE_MAX_LAYERS = 8


def check_can_plot(path: pathlib.Path) -> None:
    """Fails before any work if matplotlib is missing or `path` cannot be written."""
    try:
        import matplotlib as mpl  # noqa: F401
    except ImportError as e:
        raise MergeError(f"--plot needs matplotlib: pip install 'openpi-merge-plugin[plot]' ({e})") from e
    parent = path.parent
    if not parent.is_dir():
        raise MergeError(f"cannot write plot {path}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MergeError(f"cannot write plot {path}: parent directory {parent} is not writable")


def save(ins: Inspection, path: pathlib.Path) -> None:
    """Writes the heat maps (format from the file suffix, e.g. .png) at FIGSIZE and DPI."""
    check_can_plot(path)
    import matplotlib as mpl
    from matplotlib import colors
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on an Agg canvas: no pyplot, so the caller's backend and figure registry stay untouched.
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    experts = ins.experts or [0]
    axes = fig.subplots(2, len(experts), squeeze=False)
    step = f", step {ins.step}" if ins.step is not None else ""
    fig.suptitle(f"{ins.path}  ({'merged' if ins.kind == 'merged' else 'LoRA'} checkpoint{step})", fontsize=13)
    rel = {e: _grid(ins, e, "delta_rel_norm") for e in experts}
    keep = {e: _grid(ins, e, "bf16_survival") for e in experts}
    rel_norm = colors.LogNorm(*_log_range([g for g, _ in rel.values()]))
    rows: list[tuple[dict[int, tuple[np.ndarray, list[str]]], Any, str, str, str]] = [
        (rel, rel_norm, "viridis", "||dW|| / ||W||", "{:.2g}"),
        (keep, colors.Normalize(0.0, 1.0), "RdYlGn", "fraction of ||dW|| kept in bfloat16", "{:.1%}"),
    ]
    for row, (grids, norm, cmap_name, label, fmt) in enumerate(rows):
        cmap = mpl.colormaps[cmap_name].with_extremes(bad="lightgrey")
        image = None
        for col, expert in enumerate(experts):
            grid, names = grids[expert]
            ax = axes[row][col]
            image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", interpolation="none")
            ax.set_title(f"expert {expert}: {label}", fontsize=11)
            ax.set_yticks(range(len(names)), names, fontsize=9)
            ax.set_xticks(range(grid.shape[1]))
            ax.set_xlabel("layer")
            if grid.shape[1] <= _ANNOTATE_MAX_LAYERS:
                _annotate(ax, grid, norm, cmap, fmt)
        fig.colorbar(image, ax=list(axes[row]), label=label, shrink=0.9)
    try:
        fig.savefig(path, dpi=DPI)
    except OSError as e:
        raise MergeError(f"cannot write plot {path}: {e}") from e


def _grid(ins: Inspection, expert: int, field: str) -> tuple[np.ndarray, list[str]]:
    """(weights x layers) values of one expert; NaN where a weight has fewer layers than the others."""
    weights: list[WeightStats] = [w for w in ins.weights if w.expert == expert]
    values = [getattr(w, field) for w in weights]
    grid = np.full((len(weights), max((len(v) for v in values), default=1)), np.nan)
    for i, v in enumerate(values):
        grid[i, : len(v)] = v
    return grid, [w.name for w in weights]


def _log_range(grids: list[np.ndarray]) -> tuple[float, float]:
    """Color range of a log scale: the positive finite values of all experts (one shared scale)."""
    values = np.concatenate([g[np.isfinite(g) & (g > 0)] for g in grids])
    if not values.size:
        return 1e-3, 1.0
    low, high = float(values.min()), float(values.max())
    # At least one decade, centred on the data: layers that differ by 1% should not look different.
    spread = max(high / low, 10.0) ** 0.5
    middle = (low * high) ** 0.5
    return middle / spread, middle * spread


def _annotate(ax: Any, grid: np.ndarray, norm: Any, cmap: Any, fmt: str) -> None:
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            r, g, b, _ = cmap(norm(value))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=9, color="white" if dark else "black")
