"""The picture of an inspection: heat maps of ||dW|| / ||W|| and of bf16 survival over (layer, weight) per expert.

matplotlib is an optional extra (`pip install 'openpi-merge-plugin[plot]'`); it is imported only here.
"""

from __future__ import annotations

import glob
import os
import pathlib
import re
from typing import Any
import uuid

import numpy as np

from openpi_merge_plugin.checkpoint import output
from openpi_merge_plugin.checkpoint import output_guard
from openpi_merge_plugin.checks.inspection import Inspection
from openpi_merge_plugin.checks.inspection import WeightStats
from openpi_merge_plugin.cli import plot_mark
from openpi_merge_plugin.errors import MergeError
from openpi_merge_plugin.errors import OutputExistsError
from openpi_merge_plugin.errors import OutputRefusedError
from openpi_merge_plugin.options import shown

# Fixed size, whatever the checkpoint: 1400 x 900 pixels.
FIGSIZE = (14.0, 9.0)
DPI = 100
# Cells get their value written in them up to this many layers; the full-size models' 18 would not fit.
_ANNOTATE_MAX_LAYERS = 8


# The metadata field that carries the mark and digest (`plot_mark`), per format.
_METADATA_KEY = {".png": "Software", ".pdf": "Creator", ".svg": "Creator"}


def plot_suffix(path: pathlib.Path) -> str | None:
    suffix = pathlib.Path(path).suffix.lower()
    return None if suffix in _METADATA_KEY else f"must end in {', '.join(_METADATA_KEY)}, got {str(path)!r}"


def check_can_plot(path: pathlib.Path, inspected: pathlib.Path | None = None, *, overwrite: bool = False) -> None:
    """Fails before any work if matplotlib is missing or `path` must not or cannot be written: not inside the
    inspected directory or any checkpoint (as written and as resolved), and an existing file only with `overwrite`
    and only if this command drew it and it is unchanged since (`plot_mark`)."""
    try:
        import matplotlib as mpl  # noqa: F401
    except ImportError as e:
        raise MergeError(f"--plot needs matplotlib: pip install 'openpi-merge-plugin[plot]' ({e})") from e
    output_guard.check_name(output_guard.as_written(path), "--plot")
    written, path = output_guard.as_written(path), output_guard.absolute(path)
    output_guard.check_utf8(written, "--plot")
    if inspected is not None:
        for source in dict.fromkeys((pathlib.Path(inspected).resolve(), output_guard.as_written(inspected))):
            if any(p.is_relative_to(source) for p in (written, path)):
                raise OutputRefusedError(
                    f"--plot {shown(written)} lies inside the inspected {shown(inspected)}, which is never modified"
                )
    output_guard.check_not_in_checkpoint(written, path, "--plot")
    if path.is_symlink() or path.exists():
        if not overwrite:
            raise OutputExistsError(
                f"--plot {shown(written)} already exists (pass --overwrite to replace a picture this command drew)"
            )
        if path.is_symlink() or not path.is_file() or not _drawn_here(path):
            raise OutputRefusedError(
                f"--plot {shown(written)} already exists and is not a picture drawn by openpi-merge-lora inspect, "
                "unchanged since (its recorded sha256 does not match): choose a new file name"
            )
    output_guard.check_writable(path, written, "--plot")


def save(ins: Inspection, path: pathlib.Path, *, overwrite: bool = False) -> None:
    """Writes the heat maps (format from the file suffix, e.g. .png) at FIGSIZE and DPI, atomically, sealed with
    their sha256 (`plot_mark`)."""
    check_can_plot(path, overwrite=overwrite)
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
    suffix = path.suffix.lower()
    stem = output.temporary_stem(path)
    for stale in path.parent.glob(f"{glob.escape(stem)}*"):  # of a killed earlier run
        if re.fullmatch(rf"{re.escape(stem)}[0-9a-f]{{12}}", stale.name) and stale.is_file():
            stale.unlink(missing_ok=True)
    tmp = path.parent / f"{stem}{uuid.uuid4().hex[:12]}"
    try:
        fig.savefig(tmp, dpi=DPI, format=suffix[1:], metadata={_METADATA_KEY[suffix]: plot_mark.metadata_value()})
        tmp.write_bytes(plot_mark.seal(tmp.read_bytes()))
        if (path.is_symlink() or path.exists()) and not (overwrite and path.is_file() and _drawn_here(path)):
            raise OutputExistsError(f"--plot {shown(path)} appeared while drawing; it was left as it is")
        os.replace(tmp, path)
    except OSError as e:
        raise MergeError(f"cannot write plot {path}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)


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


def _drawn_here(path: pathlib.Path) -> bool:
    """Whether the file is a picture this command drew, unchanged since (pictures are small: read whole)."""
    if path.stat().st_size > plot_mark.MAX_BYTES:
        return False
    return plot_mark.drawn_here(path.read_bytes())
