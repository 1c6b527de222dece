"""Reading checkpoints written by the authors' CoCoOp trainer (``KaiyangZhou/CoOp``,
``trainers/cocoop.py``, on Dassl).

The trainer registers one sub-module, ``prompt_learner``, and Dassl's ``save_checkpoint`` writes
``<directory>/prompt_learner/model-best.pth.tar`` (or ``model.pth.tar-<epoch>``): a torch-saved
dict with ``state_dict``, ``epoch``, ``optimizer`` and ``scheduler``. Its ``state_dict`` holds,
in fp16 when trained with PREC=fp16:

=========================  =======================================
authors' key               dpt_fast parameter (``prompt_learner.``)
=========================  =======================================
ctx  (M, D)                ctx
meta_net.linear1.weight    meta_net.linear1.weight  (E // 16, E)
meta_net.linear1.bias      meta_net.linear1.bias
meta_net.linear2.weight    meta_net.linear2.weight  (D, E // 16)
meta_net.linear2.bias      meta_net.linear2.bias
token_prefix, token_suffix ignored, as the authors' ``load_model`` ignores them
=========================  =======================================
"""

from __future__ import annotations

import os

from torch import nn

from dpt_fast.official import CopyPlan, execute, read_part

PART = "prompt_learner"
KEYS = ("ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
        "meta_net.linear2.bias")
_HINTS = {"ctx": " (another n_ctx or ctx_init?)"}
_META_HINT = " (another CLIP or meta_net_reduction?)"


def plan_prompt_learner(prompt_learner: nn.Module, state: dict) -> CopyPlan:
    """The copies of the authors' ``prompt_learner`` state into ours, keys checked first."""
    missing = sorted(set(KEYS) - state.keys())
    unexpected = sorted(state.keys() - set(KEYS))
    if missing or unexpected:
        raise ValueError(
            f"official CoCoOp checkpoint part {PART!r} does not match this model: missing "
            f"{missing or 'nothing'}, unexpected {unexpected or 'nothing'}. Is it a CoCoOp "
            "checkpoint (trainers/cocoop.py)?"
        )
    return [(prompt_learner.get_parameter(key), state[key], f"{PART}/{key}",
             _HINTS.get(key, _META_HINT)) for key in KEYS]


def load_official_checkpoint(prompt_learner: nn.Module, directory: str | os.PathLike,
                             epoch: int | None = None) -> None:
    """Copy the authors' checkpoint into ``prompt_learner`` (all or nothing)."""
    state = read_part(directory, PART, epoch, method="CoCoOp", parts=(PART,))
    execute(plan_prompt_learner(prompt_learner, state))
