"""``dpt-fast report``: the summary table (:mod:`.summary`), the paper's tables (read by
:mod:`.collect`, built by :mod:`.tables`, written by :mod:`.render`) and the accuracy-vs-shots
figure (:mod:`.plot`, imported only for ``--plot``)."""

from __future__ import annotations

import logging
from pathlib import Path

from dpt_fast.reports.collect import collect
from dpt_fast.reports.render import FORMATS, RENDERERS
from dpt_fast.reports.summary import report_runs
from dpt_fast.reports.tables import build_tables, notes

log = logging.getLogger(__name__)


def report_command(root: Path, fmt: str = "summary", out: Path | None = None,
                   plot: Path | None = None) -> str:
    """``dpt-fast report``: the text to print. ``summary``: the per-experiment table of
    :func:`~dpt_fast.reports.summary.report_runs` (``out``: its JSON); the other formats: the
    paper's tables; ``plot``: also the accuracy-vs-shots figure."""
    if fmt not in FORMATS:
        raise ValueError(f"report: --format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if plot is not None:
        from dpt_fast.reports.plot import matplotlib_parts

        matplotlib_parts()  # fail before the work
    text = report_runs(root, out) if fmt == "summary" or out is not None else ""
    if fmt != "summary" or plot is not None:
        found = collect(root)
        tables = build_tables(found)
        if not tables:
            raise ValueError(
                f"report: none of the {len(found.runs)} run(s) under {root} fits a table of "
                "the paper (few-shot: classes 'all' and shots >= 1; base-to-new: classes "
                "'base'; cross-dataset: eval_*.json beside a run); --format summary lists them")
        if fmt != "summary":
            text = RENDERERS[fmt](tables, notes(found))
        if plot is not None:
            from dpt_fast.reports.plot import plot_curves

            plot_curves(tables, plot)
            log.info("accuracy-vs-shots figure -> %s", plot)
    return text
