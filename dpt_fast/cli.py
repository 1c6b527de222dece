"""``dpt-fast`` / ``python -m dpt_fast``: train, eval and report from the command line.

Every field of :class:`~dpt_fast.engine.config.TrainConfig` and of
:class:`~dpt_fast.config.DPTConfig` is a flag (``--n-text-ctx 8``); ``--config run.yaml``
reads the same names from YAML. Precedence: defaults < YAML < flags. ``--help`` shows each
field's documentation and default.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from pathlib import Path

import yaml

from dpt_fast.config import DPTConfig
from dpt_fast.config_fields import EVAL, fields_with
from dpt_fast.engine.config import TrainConfig, config_from_dict, config_to_dict, field_help

# The run fields `dpt-fast eval` takes (the model fields describe --official-dir checkpoints).
EVAL_FIELDS = fields_with(TrainConfig, EVAL)


def _none_or_int(text: str) -> int | None:
    return None if text.lower() in ("none", "") else int(text)


def _add_field(parser: argparse.ArgumentParser, name: str, kind, help_text: str,
               default) -> None:
    flag = "--" + name.replace("_", "-")
    kw: dict = {"dest": name, "default": argparse.SUPPRESS,
                "help": f"{help_text} (default: {default!r})"}
    origin = typing.get_origin(kind)
    if kind is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif origin is typing.Literal:
        parser.add_argument(flag, choices=typing.get_args(kind), **kw)
    elif origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind):
        parser.add_argument(flag, type=_none_or_int, metavar="INT|none", **kw)
    else:
        parser.add_argument(flag, type=kind, **kw)


def _add_config_flags(parser: argparse.ArgumentParser, only: frozenset[str] | None = None,
                      model: bool = True) -> None:
    train_help, model_help = field_help(TrainConfig), field_help(DPTConfig)
    train_types, model_types = typing.get_type_hints(TrainConfig), typing.get_type_hints(DPTConfig)
    defaults = TrainConfig()
    group = parser.add_argument_group("run")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model" or (only is not None and f.name not in only):
            continue
        _add_field(group, f.name, train_types[f.name], train_help.get(f.name, ""),
                   getattr(defaults, f.name))
    if model:
        group = parser.add_argument_group("model (DPTConfig)")
        for f in dataclasses.fields(DPTConfig):
            default = getattr(defaults.model, f.name)
            if f.name == "template":
                default = "the dataset's template"
            _add_field(group, f.name, model_types[f.name], model_help.get(f.name, ""), default)
    parser.add_argument("--config", type=Path, help="YAML file with any of the fields above")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpt-fast",
        description="Dual-modality Prompt Tuning for CLIP: train, evaluate, report, demo.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train prompts on a dataset, then evaluate")
    _add_config_flags(train)
    evaluate = sub.add_parser("eval", help="evaluate a checkpoint on a dataset's test split")
    _add_config_flags(evaluate, only=EVAL_FIELDS, model=True)
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a dpt_fast checkpoint-*.safetensors")
    source.add_argument("--official-dir", help="a directory the authors' Dassl trainer wrote")
    evaluate.add_argument("--official-epoch", type=int, default=None,
                          help="load model.pth.tar-EPOCH instead of model-best.pth.tar")
    report = sub.add_parser("report", help="aggregate results.json files over seeds")
    report.add_argument("runs", type=Path, help="folder searched recursively for results")
    report.add_argument("--out", type=Path, help="also write the summary JSON here")
    demo = sub.add_parser("demo", help="a first run with no downloads: toy CLIP, toy task")
    from dpt_fast.toy.options import add_demo_arguments

    add_demo_arguments(demo)
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, frozenset[str]]:
    """Defaults < YAML < flags; also the names of the fields the user set (YAML or flag)."""
    values = config_to_dict(TrainConfig())
    explicit: dict = {}
    if getattr(args, "config", None) is not None:
        if not args.config.is_file():
            raise SystemExit(f"dpt-fast: config file not found: {args.config}")
        loaded = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"dpt-fast: {args.config} must hold a mapping of field: value")
        model_values = loaded.pop("model", {}) or {}
        if not isinstance(model_values, dict):
            raise SystemExit(f"dpt-fast: invalid configuration: 'model' in {args.config} must "
                             f"be a mapping of DPTConfig fields, got {model_values!r} (for the "
                             f"method preset write 'method: {model_values}')")
        explicit.update(model_values)
        explicit.update(loaded)
    model_names = {f.name for f in dataclasses.fields(DPTConfig)}
    for key, value in vars(args).items():
        if key in model_names or key in values:
            explicit[key] = value
    for key, value in explicit.items():
        if key in model_names and key not in values:
            values["model"][key] = value
        else:
            values[key] = value
    try:
        return config_from_dict(values), frozenset(explicit)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"dpt-fast: invalid configuration: {err}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "report":
        from dpt_fast.engine.report import report_runs

        print(report_runs(args.runs, args.out))
        return 0
    if args.command == "demo":
        from dpt_fast.toy.demo import main_from_args

        return main_from_args(args)
    from dpt_fast.engine.run import eval_run, train_run

    config, explicit = resolve_config(args)
    if args.command == "train":
        results = train_run(config, "template" in explicit)
    else:
        results = eval_run(config, checkpoint=args.checkpoint, official_dir=args.official_dir,
                           official_epoch=args.official_epoch, explicit=explicit)
    line = f"{config.dataset} test accuracy: {results['test']['accuracy']:.2f}%"
    if "harmonic_mean" in results:
        line += (f" | new classes: {results['test_new']['accuracy']:.2f}%"
                 f" | H: {results['harmonic_mean']:.2f}")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
