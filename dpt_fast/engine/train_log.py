"""The per-epoch training log ``train_log.jsonl``: appending, reading back, repairing.

One JSON record per line and per epoch. A crash can tear the last line or lose the last epoch's
record; reading skips a torn line, and a resumed run first repairs the log from the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpt_fast.engine.run_folder import TRAIN_LOG
from dpt_fast.files import atomic_write_bytes, json_dumps

__all__ = ["TRAIN_LOG", "append_record", "read_history", "repair_log"]


def append_record(path: Path, record: dict) -> None:
    """Add one epoch's record (strict JSON: non-finite numbers as null)."""
    with open(path, "a") as f:
        f.write(json_dumps(record) + "\n")


def _log_records(path: Path) -> list[dict]:
    """The records of a train log, skipping a line a crash left half-written."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def read_history(path: Path, epochs: int) -> list[dict]:
    """The per-epoch records of ``train_log.jsonl`` for epochs 1..``epochs``, one each."""
    by_epoch = {r["epoch"]: r for r in _log_records(path)}
    return [by_epoch[e] for e in sorted(by_epoch) if e <= epochs]


def repair_log(path: Path, epochs_done: int, last_record: dict | None) -> None:
    """Before a resumed run appends to it: the log's records up to ``epochs_done`` (a torn last
    line dropped), plus ``last_record`` (from the checkpoint) if the crash lost that epoch's."""
    by_epoch = {r["epoch"]: r for r in _log_records(path) if r["epoch"] <= epochs_done}
    if last_record is not None and epochs_done not in by_epoch:
        by_epoch[epochs_done] = last_record
    text = "".join(json_dumps(by_epoch[e]) + "\n" for e in sorted(by_epoch))
    atomic_write_bytes(path, text.encode())
