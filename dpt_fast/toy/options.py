"""The demo's command-line flags and defaults, importable without torch (for ``dpt-fast``)."""

from __future__ import annotations

import argparse
from typing import Any

from dpt_fast.methods import METHOD_NAMES

DEFAULT_OUTPUT_DIR = "runs/demo"
DEFAULT_METHODS = ("coop", "vpt", "dpt")
METHOD_CHOICES = METHOD_NAMES  # every registered method runs through the engine
DEFAULT_SHOTS = 16
DEFAULT_EPOCHS = 12
DEFAULT_SEEDS = (1,)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``dpt-fast demo`` / ``python -m dpt_fast.toy.demo`` to ``parser``."""
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"results folder (default: {DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--data-dir", default=None,
                        help="where the toy task is written (default: OUTPUT_DIR/data)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--shots", type=int, default=DEFAULT_SHOTS,
                        help=f"training images per class (default: {DEFAULT_SHOTS})")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help=f"training epochs per method (default: {DEFAULT_EPOCHS})")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                       help="few-shot draw and training seeds; several give mean ± std per "
                            "method (default: 1)")
    seeds.add_argument("--seed", type=int, dest="seeds", action=_OneSeed,
                       help="one seed (same as --seeds N)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        choices=METHOD_CHOICES, help="methods to train (default: coop vpt dpt)")
    parser.add_argument("--no-timing", dest="timing", action="store_false",
                        help="skip the fast / reference step-time measurement")


class _OneSeed(argparse.Action):
    """``--seed N`` stores ``[N]`` where ``--seeds`` stores its list."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, [values])
