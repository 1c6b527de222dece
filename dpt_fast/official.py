"""Reading checkpoints written by the authors' Dassl trainer (``fanrena/DPT``).

The trainer registers three sub-modules and saves each to
``<directory>/<name>/model-best.pth.tar`` (or ``model.pth.tar-<epoch>``) as a torch-saved dict
whose ``state_dict`` holds that sub-module's tensors, in fp16 when trained with PREC=fp16:

=======================================  ==================================================
authors' sub-module and key              dpt_fast parameter
=======================================  ==================================================
prompt_learner / ctx                     text_prompts.ctx
image_encoder.transformer.ctx_learner    visual_prompts.ctx
  / ctx
image_encoder.transformer.extractor      cavpt.layers.{i}.…
  / meta_nets.{i}.weight|bias              query_proj.weight|bias
  / attns.{i}.qmlp|kmlp|vmlp.weight        attn_q|attn_k|attn_v.weight
  / lns.{i}.weight|bias                    norm_logits.weight|bias
  / classfiers.{i}.weight                  classifier.weight
  / lns2.{i}.weight|bias                   norm_prompt.weight|bias
  / ctx  (L_cavpt, n, W)                   ctx  (row i)
=======================================  ==================================================

``token_prefix``/``token_suffix`` are fixed embeddings the authors also save; like their loader,
we ignore them (they are rebuilt from the class names).
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from dpt_fast.base import DPTBase
    from dpt_fast.prompts import (
        ClassAwarePromptLayer,
        ClassAwarePrompts,
        DeepVisualPrompts,
        TextPrompts,
    )

TEXT_PART = "prompt_learner"
VISUAL_PART = "image_encoder.transformer.ctx_learner"
CAVPT_PART = "image_encoder.transformer.extractor"
DPT_PARTS = (TEXT_PART, VISUAL_PART, CAVPT_PART)
IGNORED_KEYS = frozenset({"token_prefix", "token_suffix"})

_CAVPT_LAYER_KEYS = {
    "meta_nets.{i}.weight": "query_proj.weight",
    "meta_nets.{i}.bias": "query_proj.bias",
    "attns.{i}.qmlp.weight": "attn_q.weight",
    "attns.{i}.kmlp.weight": "attn_k.weight",
    "attns.{i}.vmlp.weight": "attn_v.weight",
    "lns.{i}.weight": "norm_logits.weight",
    "lns.{i}.bias": "norm_logits.bias",
    "classfiers.{i}.weight": "classifier.weight",
    "lns2.{i}.weight": "norm_prompt.weight",
    "lns2.{i}.bias": "norm_prompt.bias",
}


def checkpoint_filename(epoch: int | None) -> str:
    return "model-best.pth.tar" if epoch is None else f"model.pth.tar-{epoch}"


class _InertTrainingState:
    """Stands in for the optimizer and LR-scheduler objects a Dassl checkpoint pickles beside
    the weights: it accepts whatever arguments and state the file gives and runs no code."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: object) -> None:
        self.state = state


def _allow_training_state_classes() -> contextlib.AbstractContextManager[Any]:
    """A context in which ``torch.load(weights_only=True)`` reads torch's optimizer and
    LR-scheduler objects as :class:`_InertTrainingState` (plus ``dict`` and ``defaultdict``,
    which rebuild their state).

    Dassl saves the scheduler's ``state_dict()`` beside the weights, and its warm-up scheduler
    keeps the cosine scheduler it hands over to (with that scheduler's optimizer) as an object
    in there. We only read ``state_dict``; mapping those classes to an inert stand-in means the
    file cannot make torch run their constructors. Needs torch >= 2.6 (named safe globals);
    older torch refuses such files with the error below.
    """
    from torch.optim import lr_scheduler

    base = getattr(lr_scheduler, "LRScheduler", lr_scheduler._LRScheduler)
    classes: list[type] = [c for c in vars(torch.optim).values()
               if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)]
    classes += [c for c in vars(lr_scheduler).values()
                if isinstance(c, type) and issubclass(c, base)]
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:
        return contextlib.nullcontext()
    names = sorted({f"{c.__module__}.{c.__qualname__}" for c in classes})
    return safe_globals([*((_InertTrainingState, name) for name in names),
                         collections.defaultdict, dict])


def read_part(directory: str | os.PathLike, part: str, epoch: int | None,
              method: str = "DPT", parts: tuple[str, ...] = DPT_PARTS) -> dict:
    """The ``state_dict`` of one sub-module's checkpoint, loaded with ``weights_only=True``.

    ``method`` and ``parts`` (the sub-modules its trainer saves) only word the error for a
    missing file.
    """
    path = Path(directory) / part / checkpoint_filename(epoch)
    if not path.is_file():
        raise FileNotFoundError(
            f"official {method} checkpoint not found: {path}. Expected the authors' layout "
            f"<directory>/{{{', '.join(parts)}}}/"
            f"{checkpoint_filename(epoch)} (the parts this method uses)."
        )
    try:
        with _allow_training_state_classes():
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, TypeError, AttributeError,
            ValueError) as err:
        raise ValueError(f"{path} is not loadable as the authors' checkpoint (a torch file of "
                         f"tensors and plain data): {_load_failure(err)}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path} has no 'state_dict' dict: not a Dassl checkpoint")
    return {k: v for k, v in checkpoint["state_dict"].items() if k not in IGNORED_KEYS}


def _load_failure(err: BaseException) -> str:
    """The reason of a failed safe ``torch.load``, without torch's advice to retry with
    ``weights_only=False`` (which would run whatever code the file names)."""
    text = str(err)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)", text)
    if found:  # drop torch's advice on allowlisting what the file names
        return found.group(1).split(" Please use")[0].strip().rstrip(".")
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first if "weights_only" not in first else type(err).__name__


def cavpt_key_map(n_layers: int, with_classifiers: bool) -> Iterator[tuple[str, int, str]]:
    """(authors' key, layer index, our key inside cavpt.layers[i]) for every mapped tensor."""
    for i in range(n_layers):
        for theirs, ours in _CAVPT_LAYER_KEYS.items():
            if ours == "classifier.weight" and not with_classifiers:
                continue
            yield theirs.format(i=i), i, ours


# One planned copy: (destination parameter, source tensor, where it came from, hint on mismatch).
CopyPlan = list[tuple[torch.Tensor, torch.Tensor, str, str]]


def _check_keys(state: dict, expected: set[str], part: str, allowed_extra: set[str]) -> None:
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected - allowed_extra)
    if missing or unexpected:
        raise ValueError(
            f"official checkpoint part {part!r} does not match this model: "
            f"missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}. Check that "
            "the method and cavpt_start_layer match the run that wrote it."
        )


def plan_text_prompts(text_prompts: TextPrompts, state: dict[str, Any]) -> CopyPlan:
    _check_keys(state, {"ctx"}, TEXT_PART, set())
    return [(text_prompts.ctx, state["ctx"], f"{TEXT_PART}/ctx",
             " (other n_text_ctx, class_specific_ctx or other classes?)")]


def plan_visual_prompts(visual_prompts: DeepVisualPrompts, state: dict[str, Any]) -> CopyPlan:
    _check_keys(state, {"ctx"}, VISUAL_PART, set())
    return [(visual_prompts.ctx, state["ctx"], f"{VISUAL_PART}/ctx",
             " (other n_visual_ctx or cavpt_start_layer?)")]


def plan_cavpt(cavpt: ClassAwarePrompts, state: dict[str, Any],
               with_classifiers: bool) -> CopyPlan:
    layers = [cast("ClassAwarePromptLayer", layer) for layer in cavpt.layers]
    mapping = list(cavpt_key_map(len(layers), with_classifiers))
    classifier_keys = {f"classfiers.{i}.weight" for i in range(len(layers))}
    allowed_extra = set() if with_classifiers else classifier_keys
    _check_keys(state, {k for k, _, _ in mapping} | {"ctx"}, CAVPT_PART, allowed_extra)
    ctx = state["ctx"]
    expected_ctx = (len(layers), *layers[0].ctx.shape)
    if tuple(ctx.shape) != expected_ctx:
        raise ValueError(
            f"{CAVPT_PART}/ctx: checkpoint tensor has shape {tuple(ctx.shape)}, this model "
            f"expects {expected_ctx} (other cavpt_start_layer or cavpt_n_ctx?)"
        )
    plan: CopyPlan = []
    for theirs, i, ours in mapping:
        hint = (" (a checkpoint for another set of classes? pass load_layer_classifiers=False "
                "to load everything else, as the authors do for cross-dataset evaluation)"
                if ours == "classifier.weight" else "")
        plan.append((layers[i].get_parameter(ours), state[theirs], f"{CAVPT_PART}/{theirs}",
                     hint))
    plan += [(layer.ctx, ctx[i], f"{CAVPT_PART}/ctx[{i}]", "") for i, layer in enumerate(layers)]
    return plan


def execute(plan: CopyPlan) -> None:
    """Check every shape first, then copy: a mismatch leaves the model untouched."""
    for target, source, where, hint in plan:
        if tuple(source.shape) != tuple(target.shape):
            raise ValueError(
                f"{where}: checkpoint tensor has shape {tuple(source.shape)}, this model "
                f"expects {tuple(target.shape)}{hint}"
            )
        if not source.is_floating_point():
            raise ValueError(f"{where}: checkpoint tensor has dtype {source.dtype}, not float")
    with torch.no_grad():
        for target, source, _, _ in plan:
            target.copy_(source.to(device=target.device, dtype=target.dtype))


def load_official_checkpoint(model: DPTBase, directory: str | os.PathLike[str],
                             epoch: int | None = None, load_layer_classifiers: bool = True) -> None:
    """Load the authors' checkpoint parts that ``model`` has (see the module docstring)."""
    plan: CopyPlan = []
    if model.text_prompts is not None:
        plan += plan_text_prompts(model.text_prompts, read_part(directory, TEXT_PART, epoch))
    if model.visual_prompts is not None:
        plan += plan_visual_prompts(model.visual_prompts,
                                    read_part(directory, VISUAL_PART, epoch))
    if model.cavpt is not None:
        plan += plan_cavpt(model.cavpt, read_part(directory, CAVPT_PART, epoch),
                           load_layer_classifiers)
    execute(plan)
