"""``dpt-fast report runs/``: aggregate results.json files over seeds (mean ± std)."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections import defaultdict
from pathlib import Path

from dpt_fast.config import DPTConfig
from dpt_fast.config_fields import REPEAT, REPORT_KEY, RESUMABLE, defaults, fields_with
from dpt_fast.engine.config import TrainConfig
from dpt_fast.files import write_json

# Fields that do not change what a run measures (where it ran, how it loaded data, its seed):
# runs that differ only in these are repetitions of one experiment.
_NOT_SETTINGS = fields_with(TrainConfig, RESUMABLE) | fields_with(TrainConfig, REPEAT)
_TRAIN_KEYS = [f.name for f in dataclasses.fields(TrainConfig) if f.name in
               fields_with(TrainConfig, REPORT_KEY)]
_MODEL_KEYS = [f.name for f in dataclasses.fields(DPTConfig) if f.name in
               fields_with(DPTConfig, REPORT_KEY)]
# Table columns: the dataset, the method, then the other key fields of the run.
KEY_COLUMNS = (_TRAIN_KEYS[0], *_MODEL_KEYS, *_TRAIN_KEYS[1:])
_HEADERS = {"subsample": "classes"}
_TRAIN_DEFAULTS, _MODEL_DEFAULTS = defaults(TrainConfig), defaults(DPTConfig)


def run_key(results: dict) -> tuple:
    """The run's values of the table's key columns (:data:`KEY_COLUMNS`), in that order."""
    return tuple(run_key_values(results)[column] for column in KEY_COLUMNS)


def run_key_values(results: dict) -> dict:
    """``{column: value}`` of the key columns; a field an older results file lacks counts as
    its default (:func:`missing_key_fields` names them)."""
    cfg = results.get("config", {})
    model = cfg.get("model", {})
    values = {**{k: cfg.get(k, _TRAIN_DEFAULTS.get(k, "?")) for k in _TRAIN_KEYS},
              **{k: model.get(k, _MODEL_DEFAULTS.get(k, "?")) for k in _MODEL_KEYS}}
    values["dataset"] = results.get("dataset", values["dataset"])
    return values


def missing_key_fields(results: dict) -> list[str]:
    """The key fields a results file (of an older version) lacks, as ``config.shots`` etc."""
    cfg = results.get("config", {})
    model = cfg.get("model", {})
    missing = [f"config.{k}" for k in _TRAIN_KEYS if k not in cfg
               and not (k == "dataset" and "dataset" in results)]
    return missing + [f"config.model.{k}" for k in _MODEL_KEYS if k not in model]


def run_settings(results: dict) -> dict:
    """The run's settings besides the seed, flattened (``model.n_text_ctx``, ...). A field an
    older results file lacks counts as its default, as in ``config_diff``."""
    cfg = {**_TRAIN_DEFAULTS, **results.get("config", {})}
    flat = {k: v for k, v in cfg.items() if k not in _NOT_SETTINGS and k != "model"}
    flat |= {f"model.{k}": v for k, v in {**_MODEL_DEFAULTS, **cfg.get("model", {})}.items()}
    return flat


def differing_settings(settings: list[dict]) -> list[str]:
    """The names of the settings whose values are not the same in all of ``settings``."""
    return sorted({k for a in settings for b in settings for k in a | b
                   if a.get(k) != b.get(k)})


def settings_label(settings: dict, names: list[str]) -> str:
    """``lr=0.01, epochs=5``: the values of the settings ``names``."""
    return ", ".join(f"{k}={settings.get(k)}" for k in names)


def variant_labels(signatures: list[str]) -> dict[str, str]:
    """For runs that share the table's key columns (each signature the JSON of
    :func:`run_settings`): the settings that tell them apart."""
    if len(signatures) < 2:
        return {sig: "" for sig in signatures}
    settings = [json.loads(sig) for sig in signatures]
    differing = differing_settings(settings)
    return {sig: settings_label(cfg, differing)
            for sig, cfg in zip(signatures, settings, strict=True)}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def read_run_results(path: Path) -> dict | str:
    """The results of a training run in ``path``, or why the file is not one (a string)."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"unreadable ({type(err).__name__}: {err})"
    if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
        return "not the results of a training run (no 'config')"
    if not isinstance(results["config"].get("model", {}), dict):
        return "'config.model' is not a mapping"
    odd = [k for k, v in run_key_values(results).items() if not _scalar(v)]
    if odd:
        return f"unexpected value of {', '.join(odd)} (not a string or a number)"
    test = results.get("test")
    if not isinstance(test, dict) or not _number(test.get("accuracy")) \
            or not _number(test.get("macro_f1")):
        return "no test accuracy in it"
    if "test_new" in results and not (isinstance(results["test_new"], dict)
                                      and _number(results["test_new"].get("accuracy"))
                                      and _number(results.get("harmonic_mean"))):
        return "incomplete new-class results"
    return results


def report_runs(root: Path, out: Path | None = None) -> str:
    """A markdown table with one row per experiment: (dataset, method, shots, classes, backbone)
    and, where runs with those differ in other settings (lr, epochs, ...), one row per setting,
    labelled with the settings that differ. Repeated seeds are flagged under the table; files
    named results.json that are not a run's results (unreadable, or e.g. the demo's summary)
    are skipped and listed.

    Raises:
        NotADirectoryError: ``root`` is not a folder.
        ValueError: no run results under ``root``.
    """
    if not root.is_dir():
        raise NotADirectoryError(f"report: not a folder: {root}")
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    seeds: dict[tuple, list] = defaultdict(list)
    skipped: list[str] = []
    for path in sorted(root.rglob("results.json")):
        results = read_run_results(path)
        if isinstance(results, str):
            skipped.append(f"- {path}: {results}")
            continue
        key = (*run_key(results), json.dumps(run_settings(results), sort_keys=True))
        seeds[key].append(results.get("config", {}).get("seed"))
        groups[key]["accuracy"].append(results["test"]["accuracy"])
        groups[key]["macro_f1"].append(results["test"]["macro_f1"])
        if "test_new" in results:
            groups[key]["new_accuracy"].append(results["test_new"]["accuracy"])
            groups[key]["harmonic_mean"].append(results["harmonic_mean"])
    if not groups:
        found = f"; skipped: {'; '.join(s[2:] for s in skipped)}" if skipped else ""
        raise ValueError(f"report: no results of a training run under {root}{found}")
    signatures: dict[tuple, list[str]] = defaultdict(list)
    for key in groups:
        signatures[key[:-1]].append(key[-1])
    labels = {(*base, sig): label for base, sigs in signatures.items()
              for sig, label in variant_labels(sigs).items()}
    columns = [_HEADERS.get(c, c) for c in KEY_COLUMNS]
    headers = [*columns, "settings", "seeds", "accuracy", "macro-F1", "new acc.", "H"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    notes, summary = [], []
    for key in sorted(groups, key=str):
        g = groups[key]
        row = dict(zip(KEY_COLUMNS, key[:-1], strict=True))
        row |= {"settings": labels[key], "seeds": seeds[key], **{m: v for m, v in g.items()}}
        summary.append(row)
        lines.append(f"| {' | '.join(str(k) for k in key[:-1])} | {labels[key] or '-'} | "
                     f"{len(seeds[key])} | {_mean_std(g['accuracy'])} | "
                     f"{_mean_std(g['macro_f1'])} | {_mean_std(g.get('new_accuracy', []))} | "
                     f"{_mean_std(g.get('harmonic_mean', []))} |")
        repeated = sorted({s for s in seeds[key] if seeds[key].count(s) > 1}, key=str)
        if repeated:
            notes.append(f"- {row['dataset']} {row['method']}: seed(s) {repeated} appear more "
                         "than once (copied runs?); each copy is counted")
    if skipped:
        notes += ["", f"Skipped {len(skipped)} file(s) that are not a run's results:", *skipped]
    if out is not None:
        write_json(out, summary)
    return "\n".join(lines + (["", *notes] if notes else []))
