"""The output folder of a training run: never clobber a run, one writer at a time.

* A folder that holds a run (any of :data:`RUN_FILES`) is refused unless the run is resumed
  (``--resume``) or replaced (``--overwrite``, which removes the old run's files first), so a
  second run can never mix its files with the first's.
* :class:`FolderLock`: a lock file naming the writing process (pid and host) keeps a second
  process out while a run writes the folder; a lock whose process is gone is taken over.
* Temporary files that a killed atomic write left behind are removed at the next start.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from dpt_fast.errors import RunFolderBusy
from dpt_fast.files import is_finite_number, orphan_temporaries, write_json

log = logging.getLogger("dpt_fast")

LAST_CHECKPOINT = "checkpoint-last.safetensors"
TRAIN_LOG = "train_log.jsonl"
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
# The files one training run writes into its output folder.
RUN_FILES = (LAST_CHECKPOINT, TRAIN_LOG, CONFIG_FILE, RESULTS_FILE)
LOCK_FILE = ".dpt-fast.lock"
# An unreadable lock file younger than this may be one whose owner is writing it: not stale.
_UNREADABLE_LOCK_GRACE_S = 10.0


def prepare_run_folder(folder: Path, *, resume: bool, overwrite: bool) -> None:
    """Check and tidy ``folder`` before a run writes anything into it (main process only).

    Raises:
        ValueError: the folder holds a run and neither ``resume`` nor ``overwrite`` is set, or
            both are set.
        FileNotFoundError: ``resume`` in a folder where no run started.
    """
    check_folder_flags(resume, overwrite)
    existing = [name for name in RUN_FILES if (folder / name).exists()]
    if existing and not (resume or overwrite):
        raise ValueError(
            f"the output folder {folder} holds a run ({', '.join(existing)}): pass --resume "
            "to continue it, --overwrite to start again (its files are removed first), or "
            "choose another --output-dir")
    if resume and not (folder / LAST_CHECKPOINT).is_file():
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"--resume: no run in {folder} (no {LAST_CHECKPOINT} "
                                    f"and no {CONFIG_FILE}); start the run without --resume")
        # The run started but no epoch finished: resuming it is starting it again.
        log.info("--resume: %s has no checkpoint yet (no epoch finished): starting from the "
                 "first epoch", folder)
    for name in RUN_FILES:
        for orphan in orphan_temporaries(folder, name):
            log.info("removing %s, left by an interrupted write", orphan)
            orphan.unlink(missing_ok=True)
    if overwrite:
        for name in existing:
            (folder / name).unlink()
    # A resumed run writes its results.json again at its end; a fresh one has none yet.
    if not resume:
        (folder / RESULTS_FILE).unlink(missing_ok=True)


def check_folder_flags(resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ValueError("--resume continues the run in the output folder and --overwrite "
                         "removes it: give only one of them")


def _boot_id() -> str | None:
    """This boot of the machine (Linux), so a lock written before a reboot is stale."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: the fields after it follow the last ")".
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[19]) if len(fields) > 19 else None


class FolderLock:
    """An exclusive lock on a run folder: ``<folder>/.dpt-fast.lock`` holding the owner's pid
    and host, created atomically (``O_EXCL``), removed on release.

    A lock left by a process that no longer runs (same host, pid gone) is stale and taken over;
    a live owner, or an owner on another host (whose process cannot be checked from here),
    raises :class:`~dpt_fast.errors.RunFolderBusy` naming it.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "boot": _boot_id(),
              "started": _process_start(os.getpid())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is moved aside, then taken
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None and self._young():
                    owner = {"pid": "?", "host": "?"}  # being written by its owner right now
                if owner is not None and not self._stale(owner, me):
                    raise RunFolderBusy(
                        f"{self.path.parent} is being written by another dpt-fast process "
                        f"(pid {owner['pid']} on {owner['host']}, lock file {self.path}); wait "
                        "for it to finish, or delete the lock file if that process is gone"
                    ) from None
                self._take_over_stale(owner)
                continue
            with os.fdopen(fd, "w") as file:
                json.dump(me, file)
            self.held = True
            return
        raise RunFolderBusy(f"could not take the lock {self.path}: another process took it")

    def _take_over_stale(self, owner: dict | None) -> None:
        """Move the stale lock aside by an atomic rename, so that of two processes taking it
        over at once only one succeeds; the other finds the winner's fresh lock next time."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}.{time.monotonic_ns()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process moved it first
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if owner is not None and moved != owner:
            # A fresh lock replaced the stale one between reading and renaming: put it back
            # (link fails if yet another lock exists, which then stands).
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        else:
            log.warning("taking over the stale lock %s (%s)", self.path,
                        "unreadable" if owner is None else f"pid {owner['pid']} is gone")
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _owner(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(owner, dict) and isinstance(owner.get("pid"), int) \
            and isinstance(owner.get("host"), str)
        return owner if ok else None

    def _young(self) -> bool:
        """Whether the lock file was created in the last seconds (its owner may still be
        writing its pid into it)."""
        try:
            return time.time() - self.path.stat().st_mtime < _UNREADABLE_LOCK_GRACE_S
        except OSError:
            return False

    @staticmethod
    def _stale(owner: dict, me: dict) -> bool:
        """Whether the lock's owner is gone: same host, and its pid no longer runs, or runs a
        process started later (the pid was reused, e.g. a container's restart) or the machine
        rebooted since. An owner on another host cannot be checked from here: never stale."""
        if owner["host"] != me["host"] or not isinstance(owner["pid"], int):
            return False
        if owner.get("boot") and me["boot"] and owner["boot"] != me["boot"]:
            return True
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, owned by another user
            return False
        started = _process_start(owner["pid"])
        return bool(owner.get("started") and started and started != owner["started"])

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def write_zero_shot_result(path: str | os.PathLike[str], dataset: str, backbone: str,
                           report: dict) -> Path:
    """Write zero-shot CLIP's result on ``dataset`` where ``dpt-fast report`` finds it.

    Args:
        path: a folder (the file is ``path/zeroshot_<dataset>.json``), or the file itself,
            which must be named ``zeroshot_*.json``.
        dataset: the dataset's registry name (``oxford_pets``), as in results.json files.
        backbone: the CLIP's name, as ``--backbone`` of the runs it is compared with.
        report: the evaluation report, e.g. ``classification_report(...)``: ``"accuracy"`` (%)
            at least; written whole under ``"test"``.

    Returns:
        The file written (atomically, strict JSON).
    """
    if not isinstance(report, dict) or not is_finite_number(report.get("accuracy")):
        raise ValueError(f"zero-shot report of {dataset}: needs a finite 'accuracy'")
    target = Path(path)
    if target.suffix != ".json":
        target = target / f"zeroshot_{dataset}.json"
    elif not target.name.startswith("zeroshot_"):
        raise ValueError(f"{target}: name it zeroshot_<dataset>.json, the files that "
                         "`dpt-fast report` looks for")
    write_json(target, {"dataset": dataset, "backbone": backbone, "test": report})
    return target
