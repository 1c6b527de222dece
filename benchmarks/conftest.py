"""The benchmark suites run in one process: pytest-benchmark turns itself off under pytest-xdist
(timings of parallel workers are not measurements), and pyproject's addopts start two xdist
workers for the test suite. ``pytest benchmarks/...`` therefore runs as with ``-n 0``."""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    # Runs before pytest-xdist's own hook (a conftest registers after the plugin), which turns
    # numprocesses into workers.
    if getattr(config.option, "numprocesses", None):
        config.option.numprocesses = 0
