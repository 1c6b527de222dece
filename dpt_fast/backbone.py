"""Which CLIP a run builds, decided in one place: open_clip model name, activation, weights.

OpenAI's CLIP weights were trained with QuickGELU (``x * sigmoid(1.702 x)``). open_clip builds
its plain model names (``ViT-B-16``) with GELU and its ``-quickgelu`` names with QuickGELU, and
loads OpenAI's weights into either, with a warning only: with GELU every activation of both
towers (the zero-shot top-K selection of CAVPT included) differs from what the weights expect.
So every place that builds a CLIP (``dpt-fast train``/``eval``/``predict``,
``DPT.from_checkpoint``) goes through :func:`resolve_clip` and :func:`build_clip`:

* the defaults name a QuickGELU model (``ViT-B-16-quickgelu`` with ``openai``);
* weights whose training activation is known (an open_clip tag's ``quick_gelu``; OpenAI's own
  file formats, see :func:`weights_format`) on a model with the other activation are built as
  asked, since the user chose the model, with one loud warning naming both;
* what was built (backbone, weights, and the activation read off the model) is recorded by
  :func:`clip_record` in ``config.json``, ``results.json`` and the checkpoint.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import open_clip
import torch
from torch import nn

from dpt_fast.seeding import random_weights

log = logging.getLogger("dpt_fast")

OPENAI_TAG = "openai"
QUICK_GELU, GELU = "quick_gelu", "gelu"
# Entries of OpenAI's TorchScript state_dict that are sizes, not weights: their presence marks
# a state_dict taken from OpenAI's release.
OPENAI_SIZE_KEYS = ("input_resolution", "context_length", "vocab_size")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")
# open_clip model names that bring their own weights (``pretrained`` does not apply).
SCHEMAS = ("hf-hub:", "local-dir:")

# What --pretrained accepts as a file, for the error about one that is not loadable.
ACCEPTED_WEIGHTS = ("open_clip checkpoints (.pt, .pth, .bin or .safetensors holding a state_dict) "
                    "and OpenAI's CLIP archives (e.g. ViT-B-16.pt)")

WeightsFormat = Literal["none", "tag", "openai_archive", "openai_state_dict", "file", "schema"]
_OPENAI_FORMATS = ("openai_archive", "openai_state_dict")


@dataclass(frozen=True)
class ClipSpec:
    """What :func:`build_clip` builds.

    Attributes:
        backbone: as given: an open_clip model name, or the path of a model config ``.json``.
        model_name: the open_clip model name built (the config file's stem for a ``.json``).
        pretrained: an open_clip tag, a weights file, or None for random weights.
        weights: how the weights are read: "none", "tag" (open_clip downloads them),
            "openai_archive" / "openai_state_dict" (OpenAI's release formats, read here),
            "file" (open_clip reads it) or "schema" (an ``hf-hub:``/``local-dir:`` model, whose
            weights come with it).
        quick_gelu: whether the model config uses QuickGELU.
        weights_quick_gelu: the activation the weights were trained with, when it is known.
    """

    backbone: str
    model_name: str
    pretrained: str | None
    weights: WeightsFormat
    quick_gelu: bool
    weights_quick_gelu: bool | None

    @property
    def activation(self) -> str:
        return QUICK_GELU if self.quick_gelu else GELU

    @property
    def mismatch(self) -> bool:
        """The weights were trained with the other activation."""
        return self.weights_quick_gelu is not None and self.weights_quick_gelu != self.quick_gelu


def _model_config(backbone: str) -> tuple[str, dict]:
    """(open_clip model name, model config) of a model name or a config ``.json`` path; a
    config file is registered with open_clip under its stem."""
    if backbone.endswith(".json"):
        path = Path(backbone)
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {path}")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a JSON model config ({err})") from None
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg")
                   if not isinstance(config, dict) or k not in config]
        if missing:
            raise ValueError(f"{path}: not an open_clip model config (no {missing})")
        open_clip.add_model_config(path)
        return path.stem, config
    if backbone.startswith(SCHEMAS):
        config = open_clip.get_model_config(backbone)  # hf-hub: downloads the config
        if config is None:
            raise ValueError(f"no open_clip model config found for {backbone}")
        return backbone, config
    name = backbone.replace("/", "-")
    config = open_clip.get_model_config(name)
    if config is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else \
            " (see open_clip.list_models(), or give a model config .json)"
        raise ValueError(f"unknown open_clip model {backbone!r}{hint}")
    return name, config


def weights_format(path: str | os.PathLike) -> WeightsFormat:
    """How a weights file is laid out.

    * "openai_archive": a TorchScript archive, the form OpenAI publishes its CLIP weights in
      (``ViT-B-16.pt``, what ``clip.load`` and the authors' code download). open_clip cannot
      read these with ``weights_only=True``.
    * "openai_state_dict": a torch-saved state_dict that still holds the size entries of
      OpenAI's archive (``input_resolution``, ``context_length``, ``vocab_size``), e.g.
      ``torch.save(torch.jit.load("ViT-B-16.pt").state_dict())``.
    * "file": anything else (open_clip's checkpoints, safetensors, ...). A plain state_dict
      with OpenAI's tensor names but without the size entries cannot be told from open_clip's
      (the names are the same): its activation is the model's.
    """
    path = Path(path)
    if path.suffix in (".safetensors", ".npz", ".npy") or not zipfile.is_zipfile(path):
        return "file"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:  # a damaged archive: the loader's error names the file
        return "file"
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
        return "openai_archive"
    try:
        # mmap: only the pickled index is read, not the tensors.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any file torch cannot peek into is left to open_clip
        return "file"
    if isinstance(state, dict) and all(key in state for key in OPENAI_SIZE_KEYS):
        return "openai_state_dict"
    return "file"


def _tag_quick_gelu(model_name: str, tag: str) -> bool:
    """The activation open_clip records for pretrained tag ``tag`` of ``model_name``; an
    unknown tag raises with the tags that exist."""
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        hint = f"its tags: {', '.join(tags)}" if tags else "it has no pretrained tags"
        sibling = _sibling(model_name)
        if sibling and tag in open_clip.list_pretrained_tags_by_model(sibling):
            hint += f"; {sibling} has the tag {tag!r}"
        raise ValueError(f"pretrained tag {tag!r} is not one of open_clip's {model_name} weights "
                         f"({hint}); or give a weights file path")
    return bool(cfg.get("quick_gelu", False))


def _sibling(model_name: str) -> str | None:
    """The open_clip model of the same architecture with the other activation, if any."""
    other = model_name.removesuffix("-quickgelu") if model_name.endswith("-quickgelu") \
        else model_name + "-quickgelu"
    return other if open_clip.get_model_config(other) is not None else None


def resolve_clip(backbone: str, pretrained: str | None) -> ClipSpec:
    """The CLIP to build for ``backbone`` (open_clip model name, or model config ``.json``)
    and ``pretrained`` (open_clip tag, weights file, or ""/"none"/None for random weights).

    Warns (``logging.warning``, one line naming both) when the weights were trained with
    another activation than the model's; the model is built as asked.

    Raises:
        ValueError: unknown model name or pretrained tag, or an unreadable config file.
        FileNotFoundError: a config or weights file that does not exist.
    """
    model_name, config = _model_config(backbone)
    quick_gelu = bool(config.get("quick_gelu", False))
    weights: WeightsFormat
    if backbone.startswith(SCHEMAS):
        pretrained, weights, weights_quick_gelu = None, "schema", None
    elif pretrained is None or pretrained.strip().lower() in ("", "none"):
        pretrained, weights, weights_quick_gelu = None, "none", None
    elif Path(pretrained).is_file():
        weights = weights_format(pretrained)
        weights_quick_gelu = True if weights in _OPENAI_FORMATS else None
    elif pretrained.endswith(WEIGHT_SUFFIXES) or os.sep in pretrained or "/" in pretrained:
        raise FileNotFoundError(f"pretrained weights file not found: {pretrained} (a path, "
                                "not one of open_clip's pretrained tags)")
    elif backbone.endswith(".json"):
        raise ValueError(f"pretrained tag {pretrained!r} with the model config {backbone}: "
                         "open_clip's tags belong to its built-in model names; give a "
                         "weights file path")
    else:
        weights, weights_quick_gelu = "tag", _tag_quick_gelu(model_name, pretrained)
    spec = ClipSpec(backbone, model_name, pretrained, weights, quick_gelu, weights_quick_gelu)
    if spec.mismatch:
        log.warning(_mismatch_message(spec))
    return spec


def load_clip(backbone: str, pretrained: str, device: torch.device) -> nn.Module:
    """An open_clip CLIP by model name or local config .json, with pretrained weights.

    ``pretrained`` is an open_clip tag ("openai", ...), a local checkpoint path (OpenAI's
    ``ViT-B-16.pt`` too), or "" / "none" for random weights (tests, smoke runs). The model
    name and activation are resolved by :func:`resolve_clip`.
    Backbone "toy" is the toy CLIP shipped inside the package (pretrained "toy"; see
    :func:`dpt_fast.toy_clip.model.load_toy_backbone`).
    """
    from dpt_fast.toy_clip import BACKBONE_NAME
    from dpt_fast.toy_clip.model import load_toy_backbone

    if backbone == BACKBONE_NAME:
        return load_toy_backbone(pretrained, device)
    return build_clip(resolve_clip(backbone, pretrained), device)


def _mismatch_message(spec: ClipSpec) -> str:
    trained = QUICK_GELU if spec.weights_quick_gelu else GELU
    source = "OpenAI's" if spec.weights in _OPENAI_FORMATS else f"the {spec.pretrained!r}"
    sibling = _sibling(spec.model_name) if not spec.backbone.endswith(".json") else None
    fix = f"use {sibling}" if sibling else \
        f"use a model config with \"quick_gelu\": {str(bool(spec.weights_quick_gelu)).lower()}"
    return (f"activation mismatch: {spec.backbone} runs {spec.activation.upper()} but "
            f"{source} weights ({spec.pretrained}) were trained with {trained.upper()}, so "
            f"every activation of both towers differs from training; {fix}")


def build_clip(spec: ClipSpec, device: torch.device | str = "cpu", *,
               load_weights: bool = True) -> nn.Module:
    """The CLIP ``spec`` describes, in eval mode on ``device``; ``load_weights=False`` leaves
    the weights random (the same model otherwise: tests build what a run would, offline).

    Raises:
        ValueError: a weights file that is not loadable (names the file and the formats
            accepted) or does not fit the model (names the difference).
    """
    device = torch.device(device)
    # Random weights (--pretrained none, load_weights=False) are drawn from a fixed seed, not
    # from whatever the process drew before, so every process builds the same CLIP; loaded
    # weights replace them.
    with random_weights():
        if spec.weights == "schema":
            clip = open_clip.create_model(spec.model_name, load_weights=load_weights, device=device)
        elif spec.weights == "none":
            clip = open_clip.create_model(spec.model_name, pretrained=None, device=device)
        elif not load_weights or spec.weights in _OPENAI_FORMATS:
            with _no_random_init_warning():  # the weights come next, or are meant to be random
                clip = open_clip.create_model(spec.model_name, pretrained=None, device="cpu")
            if load_weights:
                assert spec.pretrained is not None  # OpenAI's formats are files
                _load_openai_weights(clip, spec.pretrained)
            clip = clip.to(device)
        elif spec.weights == "file":
            # Built first and loaded by open_clip's own loader (its conversions and resizing, as
            # create_model(pretrained=path) would), so that a failure is known to be the file's.
            with _no_random_init_warning():
                clip = open_clip.create_model(spec.model_name, pretrained=None, device="cpu")
            assert spec.pretrained is not None  # weights "file" name one
            _load_weights_file(clip, spec.pretrained)
            clip = clip.to(device)
        else:
            clip = open_clip.create_model(spec.model_name, pretrained=spec.pretrained,
                                          device=device)
    return clip.eval()


@contextlib.contextmanager
def _no_random_init_warning() -> Iterator[None]:
    """Hide open_clip's "No pretrained weights loaded ... initialized randomly" (root logger)
    while it builds a model whose weights are loaded right after."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _load_openai_weights(clip: nn.Module, path: str) -> None:
    """Load OpenAI's archive or state_dict into an open_clip CLIP (same tensor names)."""
    try:
        if weights_format(path) == "openai_archive":
            with warnings.catch_warnings():
                # torch.jit.load is deprecated in favour of torch.export, which cannot read the
                # archives OpenAI published; it only rebuilds the module, running none of its
                # code. (FutureWarning in torch 2.14, DeprecationWarning in 2.11.)
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                state = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if k not in OPENAI_SIZE_KEYS}
    except (OSError, MemoryError):
        raise
    except Exception as err:  # a damaged archive, or one that holds no state_dict
        raise ValueError(_not_loadable_message(path, err)) from None
    try:
        result = clip.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensors of other shapes
        raise ValueError(_unfit_message(path, err)) from None
    _check_fit(path, result.missing_keys, result.unexpected_keys)


def _load_weights_file(clip: nn.Module, path: str) -> None:
    """Load an open_clip checkpoint file (or another layout open_clip converts) into ``clip``
    with open_clip's loader, torch's safe unpickler included; errors name the file."""
    try:
        with _quiet_protocol_warning():
            result = open_clip.load_checkpoint(clip, path, strict=False)
    except (OSError, MemoryError):  # the disk or the machine, not the file's content
        raise
    except Exception as err:
        if isinstance(err, RuntimeError) and str(err).startswith("Error(s) in loading"):
            raise ValueError(_unfit_message(path, err)) from None
        raise ValueError(_not_loadable_message(path, err)) from None
    # open_clip returns load_state_dict's result; its numpy (big_vision) reader returns {}.
    _check_fit(path, getattr(result, "missing_keys", []), getattr(result, "unexpected_keys", []))


_UNFIT_HINT = "(weights of another architecture? check the backbone)"


def _unfit_message(path: str, err: RuntimeError) -> str:
    """load_state_dict's shape error, shortened to its first differences."""
    detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
    return f"{path} does not fit open_clip's model: {detail} {_UNFIT_HINT}"


def _check_fit(path: str, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        raise ValueError(f"{path} does not fit open_clip's model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} {_UNFIT_HINT}")


def _not_loadable_message(path: str, err: Exception) -> str:
    """The error for a weights file that cannot be read: the file, why (in a few words), and
    what is accepted."""
    return (f"{path} is not a loadable CLIP weights file ({_why_not_loadable(path, err)}); "
            f"accepted: {ACCEPTED_WEIGHTS}")


def _why_not_loadable(path: str, err: Exception) -> str:
    """Why ``path`` could not be loaded, without torch's advice on how to load it unsafely.

    The loader's exception alone often does not say (a text file gives ``KeyError: 101``), so
    the file is read again here, on this error path only, to tell the cases apart.
    """
    if str(path).endswith(".safetensors"):
        return f"not a valid safetensors file: {_first_sentence(err)}"
    try:
        with _quiet_protocol_warning():
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as again:
        found = re.search(r"GLOBAL ([\w.]+)", str(again))
        if found:  # a pickle of some object: never unpickled here, it could run code
            return f"it pickles an object of class {found.group(1)}, not only tensors"
        if "Weights only load failed" in str(again):
            return "not a file of tensors written by torch.save"
        return f"not a torch file: {_first_sentence(again)}"
    except EOFError:
        return "the file is empty or cut short"
    except (OSError, MemoryError):
        raise
    except Exception as again:  # KeyError, RuntimeError of a damaged zip archive, ...
        return f"not a torch file: {type(again).__name__}: {_first_sentence(again)}"
    if not isinstance(content, dict) or not content:
        return f"it holds a {type(content).__name__}, not a state_dict of tensors"
    return f"{type(err).__name__}: {_first_sentence(err)}"


@contextlib.contextmanager
def _quiet_protocol_warning() -> Iterator[None]:
    """Hide torch's warning that a pickle's protocol is not torch.save's: the error that
    follows for such a file says what is wrong in terms of the file."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        yield


def _first_sentence(err: Exception) -> str:
    """The first sentence of an exception's message, on one line."""
    text = " ".join(str(err).split())
    return re.split(r"(?<=\.)\s", text, maxsplit=1)[0] or type(err).__name__


def clip_activation(clip: nn.Module) -> str:
    """The MLP activation of a built CLIP, read off its modules: "quick_gelu", "gelu", or the
    class names found (e.g. another activation, or both)."""
    kinds = {type(m).__name__ for m in clip.modules()
             if isinstance(m, (open_clip.transformer.QuickGELU, nn.GELU))}
    if kinds == {"QuickGELU"}:
        return QUICK_GELU
    if kinds == {"GELU"}:
        return GELU
    return "+".join(sorted(kinds)) or "unknown"


def clip_record(backbone: str, pretrained: str | None, clip: nn.Module) -> dict:
    """What a run was built on, for config.json, results.json and the checkpoint: the backbone
    and weights as configured, and the activation read off the built model."""
    return {"backbone": backbone, "pretrained": pretrained, "activation": clip_activation(clip)}


def check_activation(recorded: dict | None, clip: nn.Module, source: str) -> None:
    """Warn when ``clip`` runs another activation than the one ``recorded`` (a
    :func:`clip_record` of ``source``, or None for files that predate the record)."""
    if not recorded or "activation" not in recorded:
        return
    now = clip_activation(clip)
    if now != recorded["activation"]:
        log.warning("activation mismatch: the prompts of %s were trained on %s (%s), this CLIP "
                    "runs %s; build the recorded backbone", source, recorded.get("backbone"),
                    recorded["activation"].upper(), now.upper())


def openai_backbone(name: str) -> str:
    """open_clip's model for one of OpenAI's ``clip`` names (the authors'
    ``MODEL.BACKBONE.NAME``): ``ViT-B/32`` -> ``ViT-B-32-quickgelu``."""
    model = name.strip().replace("/", "-").replace("@336px", "-336") + "-quickgelu"
    if open_clip.get_model_config(model) is None:
        raise ValueError(f"no open_clip model for OpenAI's backbone {name!r} (tried {model})")
    return model
