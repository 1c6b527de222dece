"""The accuracy-vs-shots figure of ``dpt-fast report --plot`` (the CoOp paper's figure), drawn
from the tables of :mod:`dpt_fast.reports.tables` with matplotlib's Agg canvas (no pyplot:
the process's backend is left alone). matplotlib is optional: without it, one clear error."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from dpt_fast.files import atomic_write_bytes
from dpt_fast.reports.tables import Table, marks


class MatplotlibMissing(ImportError, ValueError):
    """``--plot`` without matplotlib. A ValueError too, so that the CLI reports it as bad input
    (one line, exit 2) rather than as an internal error."""


def matplotlib_parts() -> tuple[Any, Any, Any]:
    """matplotlib's Figure, Agg canvas and rcParams; a clear error when it is missing."""
    try:
        from matplotlib import rcParams
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise MatplotlibMissing("--plot needs matplotlib, which is not installed: "
                                "pip install matplotlib") from err
    return Figure, FigureCanvasAgg, rcParams


def plot_curves(tables: list[Table], path: Path) -> None:
    """Accuracy vs shots, as the CoOp paper's figure: a panel per dataset and the Average, a
    line per few-shot block (std as a band), zero-shot CLIP as a star at 0 shots."""
    figure_class, canvas_class, rc_params = matplotlib_parts()
    few = [t for t in tables if t.section == "few_shot"]
    zero = [t for t in tables if t.section == "zero_shot"]
    if not few:
        raise ValueError(f"--plot: no few-shot runs (classes 'all', shots >= 1) to draw for "
                         f"{path}")
    panels = [*sorted({r.label for t in few for r in t.rows if not r.average}), "Average"]
    shots = [c.shots for c in few[0].columns]
    # Shots evenly spaced (1, 2, 4, 8, 16 are doublings), zero-shot at the left.
    x_of = {k: i + (1 if zero else 0) for i, k in enumerate(shots)}
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    figure = figure_class(figsize=(4 * cols, 3.2 * rows + 0.8), layout="constrained")
    canvas_class(figure)  # the Agg canvas: no pyplot, no switch of the process's backend
    # A fixed colour per block: a block missing from a panel must not shift the others'.
    cycle = rc_params["axes.prop_cycle"].by_key().get("color", ["C0"])
    colour = {t.title: cycle[i % len(cycle)] for i, t in enumerate(few + zero)}
    for i, panel in enumerate(panels):
        axes = figure.add_subplot(rows, cols, i + 1)
        partial_points = False
        for table in few:
            row = table.row(panel)
            if row is None:
                continue
            points = [(x_of[c.shots], s) for c, s in zip(table.columns, row.cells, strict=True)
                      if s is not None]
            xs, means = [x for x, _ in points], [s.mean for _, s in points]
            axes.plot(xs, means, marker="o", color=colour[table.title], label=table.title)
            # Hollow: an average that lacks some datasets (the table's dagger).
            hollow = [(x_of[c.shots], s.mean) for c, s, m in zip(
                table.columns, row.cells, marks(row), strict=True) if s is not None and m]
            if hollow:
                partial_points = True
                axes.plot(*zip(*hollow, strict=True), marker="o", linestyle="none",
                          markerfacecolor="white", color=colour[table.title])
            bands = [(s.mean, s.std) for _, s in points if s.std is not None]
            if len(bands) == len(points):
                axes.fill_between(xs, [m - d for m, d in bands], [m + d for m, d in bands],
                                  color=colour[table.title], alpha=0.2, linewidth=0)
        for table in zero:
            row = table.row(panel)
            if row is not None and row.cells[0] is not None:
                axes.plot([0], [row.cells[0].mean], marker="*", markersize=12, linestyle="none",
                          color=colour[table.title], label=table.title)
        ticks = ([0] if zero else []) + [x_of[k] for k in shots]
        axes.set_xticks(ticks, [str(k) for k in ([0] if zero else []) + shots])
        axes.set_title(f"{panel} (hollow: not every dataset)" if partial_points else panel)
        axes.set_xlabel("shots per class")
        axes.grid(alpha=0.3)
        if i % cols == 0:
            axes.set_ylabel("accuracy (%)")
    handles: dict[str, object] = {}
    for axes in figure.axes:
        for handle, label in zip(*axes.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    figure.legend(list(handles.values()), list(handles), loc="outside lower center",
                  ncols=min(len(handles), 4))
    buffer = io.BytesIO()
    figure.savefig(buffer, format=path.suffix.lstrip(".").lower() or "png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
