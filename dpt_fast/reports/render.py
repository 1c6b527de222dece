"""``dpt-fast report DIR --format markdown|csv|latex``: the tables of
:mod:`dpt_fast.reports.tables` written out, with their captions and the report's notes."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from dpt_fast.reports.collect import collect
from dpt_fast.reports.tables import MARK, SECTIONS, Stat, Table, build_tables, marks, notes

log = logging.getLogger(__name__)

FORMATS = ("summary", "markdown", "csv", "latex")
_CAPTIONS = {
    "few_shot": "Cells: mean ± std over seeds (number of seeds). Average: the mean over the "
                "datasets of the per-dataset means.",
    "base2new": "base / new: accuracy on the base / new classes; H: their harmonic mean, per run "
                "(cells: mean ± std over seeds (number of seeds)). Average H: the harmonic mean "
                "of the average base and new accuracies, as in the CoOp/CoCoOp papers.",
    "cross_dataset": "source: accuracy on the training dataset; one column per target dataset "
                     "the source's prompts were evaluated on (eval_<target>_<classes>.json "
                     "beside its results.json); Average: the mean over the targets.",
    "zero_shot": "Zero-shot CLIP (zeroshot runs and zeroshot_<dataset>.json files; n: "
                 "results).",
}
_CSV_HEADER = ("table", "method", "backbone", "variant", "dataset", "shots", "metric", "mean",
               "std", "n")


def _cell(stat: Stat | None, mark: str = "") -> str:
    return "-" if stat is None else stat.text() + mark


def _by_section(tables: list[Table]) -> list[tuple[str, str, list[Table]]]:
    """(section, heading, its tables) for each section that has tables, in the papers' order."""
    grouped = [(section, heading, [t for t in tables if t.section == section])
               for section, heading in SECTIONS.items()]
    return [group for group in grouped if group[2]]


def render_markdown(tables: list[Table], notes: list[str]) -> str:
    lines: list[str] = []
    for section, heading, chosen in _by_section(tables):
        lines += [f"## {heading}", "", _CAPTIONS[section], ""]
        for table in chosen:
            header = [table.row_header, *(c.label for c in table.columns)]
            lines += [f"### {table.title}", "", "| " + " | ".join(header) + " |",
                      "|" + "---|" * len(header)]
            lines += ["| " + " | ".join([row.label, *(
                _cell(s, m) for s, m in zip(row.cells, marks(row), strict=True))]) + " |"
                for row in table.rows]
            lines += ["", *table.footnotes, ""] if table.footnotes else [""]
    if notes:
        lines += ["Notes:", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines).rstrip("\n")


def render_csv(tables: list[Table], notes: list[str]) -> str:
    """One line per cell; the notes go to the log (stderr), so the output stays plain CSV."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_CSV_HEADER)
    for table in tables:
        for row in table.rows:
            for column, stat in zip(table.columns, row.cells, strict=True):
                if stat is None:
                    continue
                shots = column.shots if column.shots is not None else row.shots
                writer.writerow([table.section, table.method, table.backbone, table.variant,
                                 row.dataset, "" if shots is None else shots, column.metric,
                                 f"{stat.mean:.4f}",
                                 "" if stat.std is None else f"{stat.std:.4f}", stat.n])
    for note in notes:
        log.warning("%s", note)
    return buffer.getvalue().rstrip("\n")


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "±": r"$\pm$", MARK: r"$^\dagger$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def render_latex(tables: list[Table], notes: list[str]) -> str:
    """A booktabs ``tabular`` per block (needs ``\\usepackage{booktabs}``)."""
    lines: list[str] = []
    for section, heading, chosen in _by_section(tables):
        lines += [f"% {heading}", f"% {_CAPTIONS[section]}"]
        for table in chosen:
            width = len(table.columns) + 1
            header = [table.row_header, *(c.label for c in table.columns)]
            lines += [rf"\begin{{tabular}}{{l{'c' * len(table.columns)}}}", r"\toprule",
                      rf"\multicolumn{{{width}}}{{l}}{{\textbf{{{latex_escape(table.title)}}}}}"
                      r" \\", r"\midrule", " & ".join(map(latex_escape, header)) + r" \\",
                      r"\midrule"]
            for row in table.rows:
                if row.average:
                    lines.append(r"\midrule")
                cells = [_cell(s, m) for s, m in zip(row.cells, marks(row), strict=True)]
                lines.append(" & ".join(map(latex_escape, [row.label, *cells])) + r" \\")
            lines.append(r"\bottomrule")
            lines += [rf"\multicolumn{{{width}}}{{l}}{{\footnotesize {latex_escape(note)}}} \\"
                      for note in table.footnotes]
            lines += [r"\end{tabular}", ""]
    lines += [f"% {line}" for note in notes for line in note.splitlines()]
    return "\n".join(lines).rstrip("\n")


RENDERERS = {"markdown": render_markdown, "csv": render_csv, "latex": render_latex}


def report_tables(root: Path, fmt: str = "markdown") -> str:
    """The paper's tables of the runs under ``root`` in ``fmt`` (markdown, csv or latex)."""
    found = collect(root)
    return RENDERERS[fmt](build_tables(found), notes(found))
