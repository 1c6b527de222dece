"""``dpt-fast report DIR --format markdown|csv|latex [--plot PNG]``: the paper's tables.

Everything is read from the JSON files, nothing from folder names:

* ``results.json`` of ``dpt-fast train`` (:func:`dpt_fast.engine.run.train_run`), read and keyed
  by :mod:`dpt_fast.reports.summary` (the ``--format summary`` table);
* ``eval_<target>_<subsample>.json`` of ``dpt-fast eval`` (:func:`dpt_fast.engine.run.eval_run`)
  in the folder of a results.json: that run's prompts evaluated on another dataset
  (cross-dataset transfer, domain generalisation);
* the results.json of a ``zeroshot`` run (shots 0, all classes): zero-shot CLIP on a dataset,
  as are ``zeroshot_<dataset>.json`` files anywhere in the tree, written by
  :func:`write_zero_shot_result` (and by sweeps of earlier versions) as
  ``{"dataset": str, "backbone": str, "test": report}`` where ``report`` is an evaluation
  report like the ``"test"`` of a results.json (only its ``"accuracy"``, in %, is read).

The tables, one block per method (and per backbone and per settings variant):

* few-shot (subsample "all", shots >= 1): a row per dataset + Average, a column per shot count;
* base-to-new (subsample "base"): a row per dataset + Average, columns base / new / H;
* cross-dataset / domain generalisation: a row per (source, shots): the source's accuracy, one
  column per target and the average over the targets;
* zero-shot CLIP: a row per dataset + Average.

A cell is ``mean ± std (n)`` over the n seeds (sample std; 0.00 for one seed). Average rows and
columns are the mean of the per-dataset (per-target) means; they have no std.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from dpt_fast.methods import METHOD_NAMES
from dpt_fast.reports.summary import (
    differing_settings,
    missing_key_fields,
    read_run_results,
    run_key_values,
    run_settings,
    settings_label,
)

log = logging.getLogger(__name__)

FORMATS = ("summary", "markdown", "csv", "latex")
SECTIONS = {
    "few_shot": "Few-shot classification (all classes), test accuracy (%)",
    "base2new": "Base-to-new generalisation, test accuracy (%)",
    "cross_dataset": "Cross-dataset transfer / domain generalisation, test accuracy (%)",
    "zero_shot": "Zero-shot CLIP, test accuracy (%)",
}
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
_MARK = "†"  # an Average over fewer datasets (targets) than the block has
_EVAL_FILE = re.compile(r"eval_(?P<target>.+)_(?P<subsample>all|base|new)\.json")
_CSV_HEADER = ("table", "method", "backbone", "variant", "dataset", "shots", "metric", "mean",
               "std", "n")


class MatplotlibMissing(ImportError, ValueError):
    """``--plot`` without matplotlib. A ValueError too, so that the CLI reports it as bad input
    (one line, exit 2) rather than as an internal error."""


@dataclass(frozen=True)
class Stat:
    """One cell: the mean, the std (None for averages over datasets) and the count."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def over_seeds(cls, values: Sequence[float]) -> Stat:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.mean(values), std, len(values))

    @classmethod
    def average(cls, stats: Sequence[Stat]) -> Stat:
        """The mean of the means (every dataset weighs the same, whatever its seeds)."""
        return cls(statistics.mean(s.mean for s in stats), None, len(stats))

    def text(self) -> str:
        """``72.31 ± 0.45 (3)``; an average: ``72.31``."""
        if self.std is None:
            return f"{self.mean:.2f}"
        return f"{self.mean:.2f} ± {self.std:.2f} ({self.n})"


@dataclass(frozen=True)
class Run:
    """What the tables use of one results.json (and the eval_*.json files beside it)."""

    path: Path
    dataset: str
    method: str
    shots: int
    subsample: str
    backbone: str
    seed: object
    settings: dict
    accuracy: float
    new_accuracy: float | None = None
    harmonic: float | None = None
    transfers: dict[str, float] = field(default_factory=dict)  # target column -> accuracy
    variant: str = ""  # the settings that set it apart from runs of its cell, see _label_variants


@dataclass(frozen=True)
class ZeroShot:
    path: Path
    dataset: str
    backbone: str
    accuracy: float


@dataclass(frozen=True)
class Column:
    label: str
    metric: str  # the CSV's "metric"
    shots: int | None = None  # the column's shot count (few-shot); else the row's


@dataclass
class Row:
    label: str
    dataset: str
    shots: int | None
    cells: list[Stat | None]
    marks: list[str] = field(default_factory=list)  # a footnote mark per cell ("" for none)
    average: bool = False


@dataclass
class Table:
    """One block: a method (backbone, variant) in one section."""

    section: str
    method: str
    backbone: str
    variant: str
    title: str
    row_header: str
    columns: list[Column]
    rows: list[Row]
    footnotes: list[str] = field(default_factory=list)

    def row(self, dataset: str) -> Row | None:
        return next((r for r in self.rows if r.label == dataset), None)


@dataclass
class Found:
    """The runs and zero-shot results under a folder, and what was noticed reading them."""

    runs: list[Run]
    zero_shot: list[ZeroShot]
    skipped: list[str] = field(default_factory=list)
    older: list[str] = field(default_factory=list)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _read_report(path: Path, need: Iterable[str] = ("dataset",)) -> dict | str:
    """An eval or zero-shot file: its JSON, or why it is not one (a string)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"unreadable ({type(err).__name__}: {err})"
    if not isinstance(data, dict) or not isinstance(data.get("test"), dict) \
            or not _number(data["test"].get("accuracy")):
        return "no test accuracy in it"
    lacking = [name for name in need if not isinstance(data.get(name), str)]
    if lacking:
        return f"no {' or '.join(repr(n) for n in lacking)} in it"
    return data


def _read_transfers(folder: Path, skipped: list[str]) -> dict[str, float]:
    """``{target column: accuracy}`` of the eval_*.json files in a run's folder."""
    transfers = {}
    for path in sorted(folder.glob("eval_*.json")):
        data = _read_report(path)
        if isinstance(data, str):
            skipped.append(f"{path}: {data}")
            continue
        # The classes evaluated: eval_run names them only in the default file name
        # (eval_<dataset>_<subsample>.json); a name given by the caller means all classes.
        match = _EVAL_FILE.fullmatch(path.name)
        subsample = data.get("subsample", match["subsample"] if match else "all")
        column = data["dataset"] if subsample == "all" else f"{data['dataset']} ({subsample})"
        transfers[column] = float(data["test"]["accuracy"])
    return transfers


def _run(path: Path, results: dict, skipped: list[str]) -> Run | None:
    key = run_key_values(results)
    if not isinstance(key["shots"], int) or isinstance(key["shots"], bool):
        skipped.append(f"{path}: config.shots is not an integer ({key['shots']!r})")
        return None
    new = results.get("test_new")
    return Run(path=path, dataset=str(key["dataset"]), method=str(key["method"]),
               shots=key["shots"], subsample=str(key["subsample"]),
               backbone=str(key["backbone"]), seed=results["config"].get("seed"),
               settings=run_settings(results), accuracy=float(results["test"]["accuracy"]),
               new_accuracy=float(new["accuracy"]) if new else None,
               harmonic=float(results["harmonic_mean"]) if new else None,
               transfers=_read_transfers(path.parent, skipped))


def _label_variants(runs: list[Run]) -> list[Run]:
    """Label each run with the settings that keep it apart from runs of its cell (same method,
    backbone, classes, dataset and shots, other lr, epochs, ...).

    The settings that differ within any cell label every run of the method (backbone, classes),
    so that one value of a swept setting makes one block across all datasets; settings that
    differ only between cells (each dataset's template, per-shot epochs) label nothing.
    """
    cells: dict[tuple, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        cells[run.method, run.backbone, run.subsample][run.dataset, run.shots].append(
            run.settings)
    names = {group: sorted({name for settings in by_cell.values()
                            for name in differing_settings(settings)})
             for group, by_cell in cells.items()}
    return [replace(run, variant=settings_label(
        run.settings, names[run.method, run.backbone, run.subsample])) for run in runs]


def collect(root: Path) -> Found:
    """The runs (with their transfers) and zero-shot results under ``root``.

    Raises:
        NotADirectoryError: ``root`` is not a folder.
        ValueError: neither run results nor zero-shot results under ``root``.
    """
    if not root.is_dir():
        raise NotADirectoryError(f"report: not a folder: {root}")
    found = Found([], [])
    run_folders = set()
    for path in sorted(root.rglob("results.json")):
        results = read_run_results(path)
        if isinstance(results, str):
            found.skipped.append(f"{path}: {results}")
            continue
        run = _run(path, results, found.skipped)
        if run is None:
            continue
        run_folders.add(path.parent)
        if run.shots == 0 and run.subsample == "all":
            # A zero-shot CLIP run (--methods zeroshot): the zero-shot rows and the marker.
            found.zero_shot.append(ZeroShot(path, run.dataset, run.backbone, run.accuracy))
            continue
        found.runs.append(run)
        missing = missing_key_fields(results)
        if missing:
            found.older.append(f"{path}: {', '.join(missing)}")
    for path in sorted(root.rglob("eval_*.json")):
        if path.parent not in run_folders:
            found.skipped.append(f"{path}: no results.json of a training run beside it (the "
                                 "source run)")
    for path in sorted(root.rglob("zeroshot_*.json")):
        data = _read_report(path, need=("dataset", "backbone"))
        if isinstance(data, str):
            found.skipped.append(f"{path}: {data}")
        else:
            found.zero_shot.append(ZeroShot(path, data["dataset"], data["backbone"],
                                            float(data["test"]["accuracy"])))
    if not found.runs and not found.zero_shot:
        why = f"; skipped: {'; '.join(found.skipped)}" if found.skipped else ""
        raise ValueError(f"report: no results of a training run under {root}{why}")
    found.runs = _label_variants(found.runs)
    return found


# --- the tables ------------------------------------------------------------------------------


def _method_order(method: str) -> tuple:
    order = list(METHOD_NAMES)  # the registry's order: the paper's
    return (order.index(method) if method in order else len(order), method)


def _blocks(runs: Iterable[Run], extra: Callable[[Run], tuple] = lambda run: ()
            ) -> list[tuple[tuple, list[Run]]]:
    """Runs grouped by block (method, backbone, variant, *extra), methods in the paper's
    order."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        key = (run.method, run.backbone, run.variant, *extra(run))
        groups[key].append(run)
    return sorted(groups.items(), key=lambda item: (_method_order(item[0][0]), item[0][1:]))


def _title(method: str, backbone: str, variant: str, show_backbone: bool) -> str:
    details = ([backbone] if show_backbone else []) + ([variant] if variant else [])
    return f"{method} ({'; '.join(details)})" if details else method


def _over_seeds(runs: list[Run], key: Callable[[Run], tuple],
                value: Callable[[Run], float | None]) -> dict[tuple, Stat]:
    values: dict[tuple, list[float]] = defaultdict(list)
    for run in runs:
        v = value(run)
        if v is not None:
            values[key(run)].append(v)
    return {k: Stat.over_seeds(v) for k, v in values.items()}


def _shots_label(shots: int) -> str:
    return "all images" if shots < 1 else f"{shots} shot{'s' if shots != 1 else ''}"


def _few_shot(runs: list[Run], show_backbone: bool) -> list[Table]:
    chosen = [r for r in runs if r.subsample == "all" and r.shots >= 1]
    # One set of columns for every block: the methods line up.
    all_shots = sorted({r.shots for r in chosen})
    columns = [Column(f"{k}-shot", "accuracy", k) for k in all_shots]
    tables = []
    for (method, backbone, variant), members in _blocks(chosen):
        stats = _over_seeds(members, lambda r: (r.dataset, r.shots), lambda r: r.accuracy)
        datasets = sorted({r.dataset for r in members})
        rows = [Row(d, d, None, [stats.get((d, k)) for k in all_shots]) for d in datasets]
        average = Row("Average", "Average", None, [], average=True)
        partial: dict[tuple, list[int]] = defaultdict(list)  # missing datasets -> shots
        for k in all_shots:
            present = [stats[d, k] for d in datasets if (d, k) in stats]
            missing = tuple(d for d in datasets if (d, k) not in stats)
            average.cells.append(Stat.average(present) if present else None)
            average.marks.append(_MARK if present and missing else "")
            if present and missing:
                partial[missing].append(k)
        footnotes = [f"{_MARK} {', '.join(f'{k}-shot' for k in shots)}: average over "
                     f"{len(datasets) - len(missing)} of {len(datasets)} datasets (no runs of "
                     f"{', '.join(missing)})" for missing, shots in partial.items()]
        tables.append(Table("few_shot", method, backbone, variant,
                            _title(method, backbone, variant, show_backbone), "Dataset",
                            columns, [*rows, average], footnotes))
    return tables


def _harmonic_mean(a: float, b: float) -> float:
    # The formula of dpt_fast.engine.metrics.harmonic_mean, which imports torch.
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def _base2new(runs: list[Run], show_backbone: bool) -> list[Table]:
    chosen = [r for r in runs if r.subsample == "base" and r.new_accuracy is not None]
    columns = [Column("base", "base"), Column("new", "new"), Column("H", "H")]
    tables = []
    for (method, backbone, variant, shots), members in _blocks(chosen, lambda r: (r.shots,)):
        metrics = (lambda r: r.accuracy, lambda r: r.new_accuracy, lambda r: r.harmonic)
        per = [_over_seeds(members, lambda r: (r.dataset,), m) for m in metrics]
        datasets = sorted({r.dataset for r in members})
        rows = [Row(d, d, shots, [p[d,] for p in per]) for d in datasets]
        base = Stat.average([per[0][d,] for d in datasets])
        new = Stat.average([per[1][d,] for d in datasets])
        # As the CoOp/CoCoOp papers: H of the averages, not the average of the per-dataset Hs.
        h = Stat(_harmonic_mean(base.mean, new.mean), None, len(rows))
        average = Row("Average", "Average", shots, [base, new, h], ["", "", ""], average=True)
        title = f"{_title(method, backbone, variant, show_backbone)}, {_shots_label(shots)}"
        tables.append(Table("base2new", method, backbone, variant, title, "Dataset", columns,
                            [*rows, average]))
    return tables


def _cross_dataset(runs: list[Run], show_backbone: bool) -> list[Table]:
    chosen = [r for r in runs if r.transfers]
    tables = []
    for (method, backbone, variant), members in _blocks(chosen):
        targets = sorted({t for r in members for t in r.transfers})
        columns = [Column("source", "source"), *(Column(t, t) for t in targets),
                   Column("Average", "average")]
        rows, footnotes = [], []
        for source, shots, subsample in sorted({(r.dataset, r.shots, r.subsample)
                                                for r in members}):
            mine = [r for r in members if (r.dataset, r.shots, r.subsample) == (
                source, shots, subsample)]
            cells: list[Stat | None] = [Stat.over_seeds([r.accuracy for r in mine])]
            for target in targets:
                values = [r.transfers[target] for r in mine if target in r.transfers]
                cells.append(Stat.over_seeds(values) if values else None)
            present = [c for c in cells[1:] if c is not None]
            label = f"{source}, {_shots_label(shots)}" + (
                f", classes {subsample}" if subsample != "all" else "")
            mark = _MARK if len(present) < len(targets) else ""
            if mark:
                missing = [t for t, c in zip(targets, cells[1:], strict=True) if c is None]
                footnotes.append(f"{_MARK} {label}: average over {len(present)} of "
                                 f"{len(targets)} targets (no eval of {', '.join(missing)})")
            rows.append(Row(label, source, shots, [*cells, Stat.average(present)],
                            [""] * (len(cells)) + [mark]))
        tables.append(Table("cross_dataset", method, backbone, variant,
                            _title(method, backbone, variant, show_backbone), "Source",
                            columns, rows, footnotes))
    return tables


def _zero_shot(results: list[ZeroShot], show_backbone: bool) -> list[Table]:
    tables = []
    for backbone in sorted({z.backbone for z in results}):
        mine = [z for z in results if z.backbone == backbone]
        datasets = sorted({z.dataset for z in mine})
        stats = [Stat.over_seeds([z.accuracy for z in mine if z.dataset == d]) for d in datasets]
        rows = [Row(d, d, 0, [stat]) for d, stat in zip(datasets, stats, strict=True)]
        average = Row("Average", "Average", 0, [Stat.average(stats)],
                      [""], average=True)
        title = f"zero-shot CLIP ({backbone})" if show_backbone else "zero-shot CLIP"
        tables.append(Table("zero_shot", "zero-shot", backbone, "", title, "Dataset",
                            [Column("0-shot", "accuracy", 0)], [*rows, average]))
    return tables


def build_tables(found: Found) -> list[Table]:
    """Every table the runs make, in the order of :data:`SECTIONS`."""
    show_backbone = len({r.backbone for r in found.runs}
                        | {z.backbone for z in found.zero_shot}) > 1
    return [*_few_shot(found.runs, show_backbone), *_base2new(found.runs, show_backbone),
            *_cross_dataset(found.runs, show_backbone),
            *_zero_shot(found.zero_shot, show_backbone)]


def notes(found: Found) -> list[str]:
    """What the reader should know besides the tables: repeated seeds, runs in no table, files
    from older versions, files skipped."""
    out = []
    seeds: dict[tuple, list] = defaultdict(list)
    for run in found.runs:
        seeds[run.method, run.backbone, run.variant, run.subsample, run.dataset,
              run.shots].append(run.seed)
    for (method, _, variant, subsample, dataset, shots), found_seeds in sorted(
            seeds.items(), key=str):
        repeated = sorted({s for s in found_seeds if found_seeds.count(s) > 1}, key=str)
        if repeated:
            what = f"{method} ({variant})" if variant else method
            out.append(f"{what}, {dataset}, classes {subsample}, {_shots_label(shots)}: "
                       f"seed(s) {repeated} appear more than once (copied runs?); each copy is "
                       "counted")
    untabled = [r for r in found.runs if not r.transfers and (
        r.subsample == "new" or (r.subsample == "all" and r.shots < 1)
        or (r.subsample == "base" and r.new_accuracy is None))]
    if untabled:
        out.append(f"{len(untabled)} run(s) fit no table here (shots < 1, classes 'new', or "
                   "base classes without new-class results); `--format summary` lists them: "
                   + "; ".join(str(r.path) for r in untabled))
    if found.older:
        out.append(f"{len(found.older)} run(s) of an older version lack key fields, taken as "
                   "their defaults: " + "; ".join(found.older))
    if found.skipped:
        out.append(f"Skipped {len(found.skipped)} file(s): " + "; ".join(found.skipped))
    return out


# --- the formats -----------------------------------------------------------------------------


def _cell(stat: Stat | None, mark: str = "") -> str:
    return "-" if stat is None else stat.text() + mark


def marks(row: Row) -> list[str]:
    return row.marks or [""] * len(row.cells)


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
                  "^": r"\textasciicircum{}", "±": r"$\pm$", _MARK: r"$^\dagger$"}


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
