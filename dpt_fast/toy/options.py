"""The demo's command-line flags and defaults, importable without torch (for ``dpt-fast``)."""

from __future__ import annotations

import argparse

DEFAULT_OUTPUT_DIR = "runs/demo"
DEFAULT_METHODS = ("coop", "vpt", "dpt")
METHOD_CHOICES = ("coop", "vpt", "vlp", "dpt")
DEFAULT_SHOTS = 16
DEFAULT_EPOCHS = 20
DEFAULT_SEED = 1


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``dpt-fast demo`` / ``python -m dpt_fast.toy.demo`` to ``parser``."""
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"results folder (default: {DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--shots", type=int, default=DEFAULT_SHOTS,
                        help=f"training images per class (default: {DEFAULT_SHOTS})")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help=f"training epochs per method (default: {DEFAULT_EPOCHS})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"few-shot draw and training seed (default: {DEFAULT_SEED})")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        choices=METHOD_CHOICES, help="methods to train (default: coop vpt dpt)")
