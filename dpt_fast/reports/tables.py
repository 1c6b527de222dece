"""The paper's tables of ``dpt-fast report`` (:mod:`dpt_fast.reports.collect` reads the runs,
:mod:`dpt_fast.reports.render` writes the tables as markdown, CSV or LaTeX):

* few-shot (subsample "all", shots >= 1): a row per dataset + Average, a column per shot count;
* base-to-new (subsample "base"): a row per dataset + Average, columns base / new / H;
* cross-dataset / domain generalisation: a row per (source, shots): the source's accuracy, one
  column per target and the average over the targets;
* zero-shot CLIP: a row per dataset + Average.

A cell is ``mean ± std (n)`` over the n seeds (sample std; 0.00 for one seed). Average rows and
columns are the mean of the per-dataset (per-target) means; they have no std.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from dpt_fast.methods import METHOD_NAMES
from dpt_fast.reports.collect import Found, Run, ZeroShot

SECTIONS = {
    "few_shot": "Few-shot classification (all classes), test accuracy (%)",
    "base2new": "Base-to-new generalisation, test accuracy (%)",
    "cross_dataset": "Cross-dataset transfer / domain generalisation, test accuracy (%)",
    "zero_shot": "Zero-shot CLIP, test accuracy (%)",
}
MARK = "†"  # an Average over fewer datasets (targets) than the block has


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


def marks(row: Row) -> list[str]:
    return row.marks or [""] * len(row.cells)


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
        found = value(run)
        if found is not None:
            values[key(run)].append(found)
    return {k: Stat.over_seeds(v) for k, v in values.items()}


def _present(cells: Iterable[Stat | None]) -> list[Stat]:
    """The cells that hold a value."""
    return [cell for cell in cells if cell is not None]


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
            average.marks.append(MARK if present and missing else "")
            if present and missing:
                partial[missing].append(k)
        footnotes = [f"{MARK} {', '.join(f'{k}-shot' for k in shots)}: average over "
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
        base = Stat.average(_present(row.cells[0] for row in rows))
        new = Stat.average(_present(row.cells[1] for row in rows))
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
            mark = MARK if len(present) < len(targets) else ""
            if mark:
                missing = [t for t, c in zip(targets, cells[1:], strict=True) if c is None]
                footnotes.append(f"{MARK} {label}: average over {len(present)} of "
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
        rows = [Row(d, d, 0, [Stat.over_seeds([z.accuracy for z in mine if z.dataset == d])])
                for d in datasets]
        average = Row("Average", "Average", 0, [Stat.average(_present(r.cells[0] for r in rows))],
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
