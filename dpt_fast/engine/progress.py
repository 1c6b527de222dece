"""Progress of long work: a bar where a person watches, log lines where a file listens.

A tqdm bar redraws itself with carriage returns; written to a file (a SLURM job's log,
``nohup``, ``| tee``) thousands of redraws join into a few unreadable lines. So the mode
``auto`` draws a bar only when standard error is a terminal, and otherwise writes plain INFO
lines through the ``dpt_fast`` logger: one every ``log_every`` steps, or, with ``log_every``
0, about every :data:`AUTO_LINE_SECONDS` seconds. The end of an epoch or an evaluation has its
own summary line (written by the caller), so a short loop writes nothing here.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from tqdm import tqdm

log = logging.getLogger("dpt_fast")

ProgressMode = Literal["auto", "bar", "lines", "none"]
PROGRESS_MODES: tuple[str, ...] = ("auto", "bar", "lines", "none")
# Lines mode with log_every 0: a line when this long has passed since the last one (a cluster
# log then shows a long epoch moving without growing by more than a few lines a minute).
AUTO_LINE_SECONDS = 30.0

T = TypeVar("T")


@dataclass(frozen=True)
class ProgressSettings:
    """How long loops report their progress."""

    mode: ProgressMode = "auto"  # auto: a bar on a terminal, log lines otherwise
    log_every: int = 0  # lines mode: a line every N steps (0: about every 30 s)

    def __post_init__(self) -> None:
        if self.mode not in PROGRESS_MODES:
            raise ValueError(f"progress must be one of {list(PROGRESS_MODES)}, got {self.mode!r}")
        if self.log_every < 0:
            raise ValueError(f"log_every must be >= 0 (0: about every {AUTO_LINE_SECONDS:.0f} "
                             f"s), got {self.log_every}")

    def resolved_mode(self) -> str:
        """``bar``, ``lines`` or ``none``: ``auto`` is a bar only on a terminal."""
        if self.mode != "auto":
            return self.mode
        return "bar" if _is_terminal(sys.stderr) else "lines"


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a log line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def elapsed_and_eta(elapsed: float, done: int, left: int) -> str:
    """``1m02s elapsed, ETA 3m06s``: the ETA at the mean pace of the ``done`` units so far for
    the ``left`` ones (no ETA before the first unit is done)."""
    text = f"{format_duration(elapsed)} elapsed"
    if done > 0:
        text += f", ETA {format_duration(elapsed / done * left)}"
    return text


class Progress:
    """Reports the steps of one loop (an epoch, an evaluation, a sweep) in the chosen mode.

    ``unit`` names what is counted, in the plural (``steps``, ``batches``, ``runs``).
    ``describe`` returns the numbers to show (loss, accuracy, ...) as text pairs; it is called
    only when something is shown, so it may read values that cost a device sync.
    """

    def __init__(self, total: int | None, desc: str, settings: ProgressSettings, *,
                 enabled: bool = True, unit: str = "steps",
                 describe: Callable[[], dict[str, str]] | None = None) -> None:
        self.total, self.desc, self.settings, self.unit = total, desc, settings, unit
        self.describe = describe
        self.mode = settings.resolved_mode() if enabled else "none"
        self.done = 0
        self.start = self._last_line = time.perf_counter()
        self._bar = (tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, unit=unit)
                     if self.mode == "bar" else None)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            if self.describe is not None:
                self._bar.set_postfix(self.describe(), refresh=False)
            self._bar.update(n)
        elif self.mode == "lines" and self._line_due():
            log.info("%s", self.line())
            self._last_line = time.perf_counter()

    def _line_due(self) -> bool:
        if self.total is not None and self.done >= self.total:
            return False  # the caller's summary line follows
        every = self.settings.log_every
        if every > 0:
            return self.done % every == 0
        return time.perf_counter() - self._last_line >= AUTO_LINE_SECONDS

    def line(self) -> str:
        """``desc 120/480 (25%) loss 1.23 ... | 1m02s elapsed, ETA 3m06s``."""
        elapsed = time.perf_counter() - self.start
        where = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        if self.total:
            where += f" {self.unit} ({100 * self.done / self.total:.0f}%)"
        numbers = " ".join(f"{k} {v}" for k, v in (self.describe() if self.describe else {})
                           .items())
        timing = elapsed_and_eta(elapsed, self.done if self.total else 0,
                                 (self.total or 0) - self.done)
        return " ".join(part for part in (self.desc, where, numbers, "|", timing) if part)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], total: int | None, desc: str, settings: ProgressSettings, *,
          enabled: bool = True, unit: str = "batches") -> Iterator[T]:
    """``items``, reporting one step per item."""
    with Progress(total, desc, settings, enabled=enabled, unit=unit) as progress:
        for item in items:
            yield item
            progress.update()
