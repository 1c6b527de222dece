"""``dpt-fast`` / ``python -m dpt_fast``: train, eval, predict and report from the command line.

Every field of :class:`~dpt_fast.engine.config.TrainConfig` and of
:class:`~dpt_fast.config.DPTConfig` is a flag (``--n-text-ctx 8``); ``--config run.yaml``
reads the same names from YAML. Precedence: defaults < YAML < flags. ``--help`` shows each
field's documentation and default.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pickle
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dpt_fast import __version__
from dpt_fast.config import DPTConfig
from dpt_fast.config_fields import EVAL, fields_with
from dpt_fast.engine.config import (
    Precision,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    field_help,
)
from dpt_fast.engine.progress import PROGRESS_MODES, ProgressSettings
from dpt_fast.engine.recipe import apply_recipe, template_is_fixed
from dpt_fast.errors import ImageReadError, RunFolderBusy, TrainingDiverged
from dpt_fast.methods import METHOD_NAMES

# The run fields `dpt-fast eval` takes (the model fields describe --official-dir checkpoints).
EVAL_FIELDS = fields_with(TrainConfig, EVAL)


def _none_or_int(text: str) -> int | None:
    return None if text.lower() in ("none", "") else int(text)


def _add_field(parser: argparse._ActionsContainer, name: str, kind: Any, help_text: str,
               default: object) -> None:
    flag = "--" + name.replace("_", "-")
    kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                "help": f"{help_text} (default: {default!r})"}
    origin = typing.get_origin(kind)
    if name == "method":  # the registry's names (dpt_fast.methods), read without torch
        parser.add_argument(flag, choices=METHOD_NAMES, **kw)
    elif kind is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif origin is typing.Literal:
        parser.add_argument(flag, choices=typing.get_args(kind), **kw)
    elif origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind):
        parser.add_argument(flag, type=_none_or_int, metavar="INT|none", **kw)
    else:
        parser.add_argument(flag, type=kind, **kw)


def _add_config_flags(parser: argparse.ArgumentParser, only: frozenset[str] | None = None,
                      model: bool = True, exclude: frozenset[str] = frozenset()) -> None:
    train_help, model_help = field_help(TrainConfig), field_help(DPTConfig)
    train_types, model_types = typing.get_type_hints(TrainConfig), typing.get_type_hints(DPTConfig)
    defaults = TrainConfig()
    group = parser.add_argument_group("run")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model" or (only is not None and f.name not in only) \
                or f.name in exclude:
            continue
        _add_field(group, f.name, train_types[f.name], train_help.get(f.name, ""),
                   getattr(defaults, f.name))
    if model:
        group = parser.add_argument_group("model (DPTConfig)")
        for f in dataclasses.fields(DPTConfig):
            if f.name in exclude:
                continue
            default = getattr(defaults.model, f.name)
            if f.name == "template":
                default = "the dataset's template"
            _add_field(group, f.name, model_types[f.name], model_help.get(f.name, ""), default)
    parser.add_argument("--config", type=Path, help="YAML file with any of the fields above")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``dpt-fast: error: ...`` and exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"dpt-fast: error: {message} (see `{self.prog} --help`)\n")


def _add_common_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="debug logging, including open_clip's messages")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the traceback of an error instead of its one-line message")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dpt-fast",
        description="Dual-modality Prompt Tuning for CLIP: train, evaluate, predict, report, "
                    "demo.")
    _add_common_flags(parser, default=False)
    # argparse's version action prints and exits before the required command is asked for.
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        # The common flags work after the command too; SUPPRESS keeps a value given before it.
        child = sub.add_parser(name, help=help_text)
        _add_common_flags(child, default=argparse.SUPPRESS)
        return child

    train = command("train", "train prompts on a dataset, then evaluate")
    _add_config_flags(train)
    train.add_argument("--overwrite", action="store_true",
                       help="start again in an output folder that holds a run, removing the "
                            "old run's files first (without it such a folder is refused)")
    sweep = command("sweep", "many training runs in one command (datasets x shots x seeds x "
                    "methods): resumable, shardable over processes and SLURM array tasks")
    from dpt_fast.sweeps.command import PER_RUN_FIELDS, add_sweep_arguments

    _add_config_flags(sweep, exclude=PER_RUN_FIELDS)
    add_sweep_arguments(sweep)
    evaluate = command("eval", "evaluate a checkpoint on a dataset's test split")
    _add_config_flags(evaluate, only=EVAL_FIELDS, model=True)
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a dpt_fast checkpoint-*.safetensors")
    source.add_argument("--official-dir", help="a directory the authors' Dassl trainer wrote")
    evaluate.add_argument("--official-epoch", type=int, default=None,
                          help="load model.pth.tar-EPOCH instead of model-best.pth.tar")
    report = command("report", "aggregate results.json files over seeds")
    report.add_argument("runs", type=Path, help="folder searched recursively for results")
    report.add_argument("--out", type=Path, help="also write the summary JSON here")
    from dpt_fast.reports.render import FORMATS

    report.add_argument("--format", choices=FORMATS,
                        default="summary",
                        help="summary: a row per experiment (default); markdown, csv, latex: "
                             "the paper's tables (few-shot, base-to-new, cross-dataset)")
    report.add_argument("--plot", type=Path, metavar="PNG",
                        help="also draw accuracy vs shots per dataset here (needs matplotlib)")
    predict = command("predict", "top-k classes of images under a trained checkpoint")
    predict.add_argument("images", nargs="+", help="image files, and folders searched "
                         "recursively for images")
    predict.add_argument("--checkpoint", required=True,
                         help="a checkpoint-*.safetensors of `dpt-fast train`")
    predict.add_argument("--top-k", type=int, default=5, help="classes per image (default: 5)")
    predict.add_argument("--output", type=Path,
                         help="write a .csv or .jsonl file instead of the table on the terminal")
    predict.add_argument("--skip-unreadable", action="store_true",
                         help="exit 0 when some images cannot be read (they are still "
                              "reported, and listed with their error in --output)")
    predict.add_argument("--batch-size", type=int, default=32, help="images per batch "
                         "(default: 32)")
    predict.add_argument("--num-workers", type=int, default=2,
                         help="image-reading processes (default: 2)")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N "
                         "(default: 'auto')")
    predict.add_argument("--precision", choices=typing.get_args(Precision), default="auto",
                         help="auto: bf16 autocast on CUDA, fp32 on CPU (default: 'auto')")
    predict.add_argument("--progress", choices=PROGRESS_MODES, default="auto",
                         help="a bar on a terminal, log lines otherwise (auto); bar, lines, none "
                              "(default: 'auto')")
    predict.add_argument("--log-every", type=int, default=0,
                         help="lines mode: a progress line every N batches (0: about every "
                              "30 s; default: 0)")
    predict.add_argument("--pretrained", default=None,
                         help="CLIP weights instead of those the checkpoint records (an "
                              "open_clip tag or a file, e.g. a local copy of them)")
    demo = command("demo", "a first run with no downloads: toy CLIP, toy task")
    from dpt_fast.toy.options import add_demo_arguments

    add_demo_arguments(demo)
    return parser


def _read_yaml(path: Path) -> dict:
    """The mapping in a YAML config file; errors name the file and the line."""
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as file:
            loaded = yaml.safe_load(file) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"{path}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err.reason})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must hold a mapping of field: value, got "
                         f"{type(loaded).__name__}")
    return loaded


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, frozenset[str]]:
    """Defaults < recipe < YAML < flags; also the names of the fields the user set (YAML or
    flag). The recipe (:mod:`dpt_fast.engine.recipe`) fills the backbone and the dataset's
    values of the fields the user did not set.

    Raises:
        ValueError: a bad YAML file or value, naming the file or the field.
        FileNotFoundError: the YAML file does not exist.
    """
    loaded = _read_yaml(args.config) if getattr(args, "config", None) is not None else None
    return _resolve(args, loaded)


def _resolve(args: argparse.Namespace, loaded: dict | None, *, recipe: bool = True
             ) -> tuple[TrainConfig, frozenset[str]]:
    """Defaults < YAML < flags, then (with ``recipe``) the recipe's values for the fields the
    user did not set; a sweep applies the recipe per run instead (its method and dataset)."""
    values = config_to_dict(TrainConfig())
    explicit: dict = {}
    if loaded is not None:
        model_values = loaded.pop("model", {}) or {}
        if not isinstance(model_values, dict):
            raise ValueError(f"'model' in {args.config} must be a mapping of DPTConfig fields, "
                             f"got {model_values!r} (for the method preset write "
                             f"'method: {model_values}')")
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
        config = config_from_dict(values)
    except TypeError as err:
        raise ValueError(f"invalid configuration: {err}") from None
    if recipe:
        check_method_options(config.model.method, frozenset(explicit))
        config = apply_recipe(config, frozenset(explicit))
    return config, frozenset(explicit)


def check_method_options(method: str, explicit: frozenset[str]) -> None:
    """Refuse the options ``method`` does not read (docs/methods.md), in one line."""
    from dpt_fast.methods import get_method
    from dpt_fast.methods.base import option_flags

    model_names = {f.name for f in dataclasses.fields(DPTConfig)}
    unread = get_method(method).refused_options(explicit, model_names)
    if unread:
        raise ValueError(f"--method {method} does not read {option_flags(unread)}: drop "
                         f"{'it' if len(unread) == 1 else 'them'} (docs/methods.md lists what "
                         "each method reads)")


# Exit statuses: bad input the user can fix (flags, files, data) vs. a failure while running.
EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT
# Errors that mean "the input is wrong": their message names the culprit and the fix.
_INPUT_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError,
                 IsADirectoryError, PermissionError, pickle.UnpicklingError, ImageReadError)


def _flag_names(message: str) -> str:
    """Config field names as the flags a user types: ``TrainConfig.batch_size`` ->
    ``--batch-size``."""
    return re.sub(r"\b(?:TrainConfig|DPTConfig)\.(\w+)",
                  lambda m: "--" + m.group(1).replace("_", "-"), message)


def _one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    lines = [line.strip() for line in _flag_names(str(text)).splitlines()]
    return " ".join(line for line in lines if line) or type(err).__name__


def _check_device(name: str) -> None:
    """Refuse a device this machine does not have before any data or CLIP is loaded (the error
    lists the devices it has)."""
    from dpt_fast.engine.device import check_device

    check_device(name)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "report":
        from dpt_fast.reports.command import report_command

        print(report_command(args.runs, args.format, args.out, args.plot))
        return 0
    if args.command in ("demo", "predict"):
        _check_device(args.device)
    if args.command == "demo":
        from dpt_fast.toy.demo import main_from_args

        return main_from_args(args)
    if args.command == "predict":
        return _predict(args)
    if args.command == "sweep":
        return _sweep(args, argv)
    config, explicit = resolve_config(args)
    _check_device(config.device)
    from dpt_fast.engine.run import eval_run, train_run

    if args.command == "train":
        results = train_run(config, template_is_fixed(config, explicit),
                            overwrite=args.overwrite)
    else:
        results = eval_run(config, checkpoint=args.checkpoint, official_dir=args.official_dir,
                           official_epoch=args.official_epoch, explicit=explicit)
    line = f"{config.dataset} test accuracy: {results['test']['accuracy']:.2f}%"
    if "harmonic_mean" in results:
        line += (f" | new classes: {results['test_new']['accuracy']:.2f}%"
                 f" | H: {results['harmonic_mean']:.2f}")
    print(line)
    return 0


def _sweep(args: argparse.Namespace, argv: list[str]) -> int:
    from dpt_fast.sweeps.command import GRID_KEYS, PER_RUN_FIELDS, sweep_main

    loaded = _read_yaml(args.config) if getattr(args, "config", None) is not None else {}
    grid_values = {key: loaded.pop(key) for key in GRID_KEYS if key in loaded}
    per_run = sorted(PER_RUN_FIELDS & set(loaded))
    if per_run:
        raise ValueError(f"{args.config}: {per_run} are set per run by the sweep; use "
                         "datasets, shots, seeds, methods and protocol")
    # The grid's --shots (a list) is not TrainConfig.shots: the runs get theirs from the grid.
    run_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in GRID_KEYS})
    # The recipe's values depend on each run's dataset and method: plan_runs applies it.
    config, explicit = _resolve(run_args, loaded if args.config is not None else None,
                                recipe=False)
    if config.tensorboard:
        from dpt_fast.engine.tensorboard import check_tensorboard_available

        check_tensorboard_available()
    return sweep_main(args, config, explicit, grid_values, argv)


def _predict(args: argparse.Namespace) -> int:
    for flag, value, least in (("--top-k", args.top_k, 1), ("--batch-size", args.batch_size, 1),
                               ("--num-workers", args.num_workers, 0),
                               ("--log-every", args.log_every, 0)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    from dpt_fast.prediction.predictions import (
        check_output,
        find_images,
        format_table,
        write_predictions,
    )

    check_output(args.output)
    paths = find_images(args.images)
    from dpt_fast.prediction.predict import predict_checkpoint

    predictions = predict_checkpoint(
        args.checkpoint, paths, top_k=args.top_k, batch_size=args.batch_size,
        num_workers=args.num_workers, device=args.device, precision=args.precision,
        pretrained=args.pretrained,
        progress=ProgressSettings(mode=args.progress, log_every=args.log_every))
    failed = [p for p in predictions if p.error is not None]
    if args.output is not None:
        write_predictions(predictions, args.output)
        print(f"{len(predictions) - len(failed)} image(s) classified -> {args.output}")
    else:
        print(format_table(predictions))
    if failed and not args.skip_unreadable:
        raise ValueError(f"{len(failed)} of {len(predictions)} image(s) could not be read "
                         f"(first: {failed[0].path}: {failed[0].error}); the others were "
                         "classified; pass --skip-unreadable to accept that")
    return 0


def _configure_logging(verbose: bool) -> None:
    # open_clip logs its model loading on the root logger at INFO: shown with -v only.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("dpt_fast").setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status. Errors print one line on stderr
    (``dpt-fast: error: ...``) unless ``--debug`` asks for the traceback."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return _run(args, list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        if args.debug:
            raise
        hint = "; continue with --resume" if args.command == "train" else ""
        print(f"dpt-fast: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if args.debug:
            raise
        if isinstance(err, _INPUT_ERRORS):
            print(f"dpt-fast: error: {_one_line(err)}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(err, (TrainingDiverged, RunFolderBusy, OSError)):
            print(f"dpt-fast: error: {_one_line(err)}", file=sys.stderr)
        else:
            print(f"dpt-fast: error: internal error ({type(err).__name__}: {_one_line(err)}); "
                  "run again with --debug for the traceback", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
