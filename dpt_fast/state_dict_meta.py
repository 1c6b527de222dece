"""What a DPT ``state_dict`` carries besides the prompts, and the checks that use it.

``state_dict()`` drops the frozen CLIP and adds the class names and the model fields of the
config (as JSON in uint8 tensors, so any tensor format stores them); ``load_state_dict`` uses
them to refuse, with the difference named, prompts made for other classes or another config,
tensors of another shape, and tensors holding NaN or infinite values. The hooks are registered
by :class:`dpt_fast.base.DPTBase`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch.nn.modules.module import _IncompatibleKeys

    from dpt_fast.base import DPTBase

# Metadata entries added to state_dict() so that loading can say *why* a checkpoint does not fit.
META_CLASSNAMES = "dpt_meta.classnames"
META_CONFIG = "dpt_meta.config"


def encode_json_tensor(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode("utf-8")), dtype=torch.uint8).clone()


def decode_json_tensor(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.cpu().to(torch.uint8).tolist()).decode("utf-8"))



def state_dict_post_hook(module: DPTBase, state_dict: dict[str, Any], prefix: str,
                         local_metadata: dict[str, Any]) -> None:
    # The frozen CLIP is not part of DPT's state: drop it, and record what the prompts belong to.
    for key in [k for k in state_dict if k.startswith(prefix + "clip.")]:
        del state_dict[key]
    state_dict[prefix + META_CLASSNAMES] = encode_json_tensor(module.classnames)
    state_dict[prefix + META_CONFIG] = encode_json_tensor(module.config.model_fields())


def _describe_mismatch(module: DPTBase, classnames: list[str],
                       config: dict[str, Any]) -> list[str]:
    problems = []
    if classnames != module.classnames:
        if len(classnames) != len(module.classnames):
            problems.append(f"it was made for {len(classnames)} classes, this model has "
                            f"{len(module.classnames)}")
        else:
            i = next(i for i, (a, b) in enumerate(zip(classnames, module.classnames, strict=True))
                     if a != b)
            problems.append(f"its class {i} is {classnames[i]!r}, this model's is "
                            f"{module.classnames[i]!r}")
    ours = module.config.model_fields()
    for field in module.config.differing_model_fields(config):
        problems.append(f"{type(module.config).__name__}.{field} is {config.get(field)!r} "
                        "in the state_dict, "
                        f"{ours.get(field)!r} in this model")
    return problems


def load_pre_hook(module: DPTBase, state_dict: dict[str, Any], prefix: str,
                  local_metadata: dict[str, Any], strict: bool, missing_keys: list[str],
                  unexpected_keys: list[str], error_msgs: list[str]) -> None:
    # A foreign or mismatched state_dict is reported through missing/unexpected keys: torch
    # refuses those exactly when the caller, at whatever depth DPT is nested, loads with
    # strict=True (it passes strict=True to every hook, so the flag itself cannot be read here).
    module._load_prefix = prefix
    own = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        value = state_dict[key]
        if torch.is_tensor(value) and value.is_floating_point() and \
                not bool(torch.isfinite(value).all()):
            raise ValueError(f"state_dict tensor {key} holds NaN or infinite values: the run "
                             "that saved it diverged; it cannot be loaded")
        target = own.get(key[len(prefix):])
        if torch.is_tensor(value) and target is not None and target.shape != value.shape:
            # torch would raise even under strict=False: leave it out and report it instead.
            del state_dict[key]
            unexpected_keys.append(f"{key} (shape {tuple(value.shape)} in the state_dict, "
                                   f"{tuple(target.shape)} in this model)")
    names = state_dict.pop(prefix + META_CLASSNAMES, None)
    config = state_dict.pop(prefix + META_CONFIG, None)
    if names is None or config is None:
        missing_keys.append(
            f"{prefix}{META_CLASSNAMES} and {prefix}{META_CONFIG} (the state_dict was not "
            "written by dpt_fast's DPT.state_dict(); for the authors' checkpoints use "
            "load_official_checkpoint)"
        )
        return
    problems = _describe_mismatch(module, decode_json_tensor(names), decode_json_tensor(config))
    if problems:
        unexpected_keys.append(f"{prefix}{META_CLASSNAMES}/{META_CONFIG} of another model: the "
                               "state_dict does not belong to this model: " + "; ".join(problems))


def load_post_hook(module: DPTBase, incompatible_keys: _IncompatibleKeys) -> None:
    # The CLIP's weights are not in DPT's state_dict by design: they are not "missing".
    clip_prefix = getattr(module, "_load_prefix", "") + "clip."
    incompatible_keys.missing_keys[:] = [
        k for k in incompatible_keys.missing_keys if not k.startswith(clip_prefix)
    ]
