"""TensorBoard summaries of a run (``--tensorboard``), in ``<run folder>/tensorboard/``.

What is written, by tag (step = global training step, 1-based; epoch tags at the epoch's last
step, so every curve shares one x axis):

* ``train/loss``, ``train/accuracy``: each step's batch (process 0's share under DDP);
* ``epoch/loss``, ``epoch/accuracy``, ``epoch/images_per_s``: each epoch, over all processes;
* ``lr/<group>``: each parameter group's learning rate during the epoch (``text``, ``visual``);
* ``test/accuracy`` (and ``test/macro_f1``): at each ``--eval-every`` and at the end;
  base-to-new runs add ``test_new/accuracy`` and ``test/harmonic_mean``;
* ``config`` (text): the run's configuration as JSON.

A sweep writes one folder per run, so ``tensorboard --logdir <sweep dir>`` lists every run.
tensorboard is an optional extra (``pip install -e ".[tensorboard]"``).
"""

from __future__ import annotations

import json
from pathlib import Path

TENSORBOARD_DIR = "tensorboard"
_EXTRA_HINT = ('--tensorboard needs the tensorboard package: pip install -e ".[tensorboard]" '
               "(or pip install tensorboard)")


def check_tensorboard_available() -> None:
    """Raise ValueError with the install command when tensorboard is missing (before a run
    starts, so a missing extra never costs a training)."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ValueError(_EXTRA_HINT) from None


class RunSummaries:
    """The TensorBoard writer of one run; every method is a no-op when ``enabled`` is False
    (no ``--tensorboard``, or a DDP process other than the first)."""

    def __init__(self, run_dir: Path, enabled: bool, *, purge_step: int | None = None) -> None:
        self._writer = None
        if enabled:
            check_tensorboard_available()
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops what a crashed attempt wrote after the
            # checkpoint it resumes from, so its curves do not fold back on themselves.
            self._writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge_step)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def config(self, config: dict) -> None:
        if self._writer is not None:
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
            # Markdown: indented by four spaces, the JSON shows as a code block.
            self._writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)

    def evaluation(self, prefix: str, report: dict, step: int) -> None:
        """``<prefix>/accuracy`` and ``<prefix>/macro_f1`` of an evaluation report."""
        self.scalars({f"{prefix}/{name}": report[name] for name in ("accuracy", "macro_f1")
                      if isinstance(report.get(name), (int, float))}, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
