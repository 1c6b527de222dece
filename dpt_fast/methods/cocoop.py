"""CoCoOp as a registered method: :class:`dpt_fast.CoCoOp`, trained by the engine's SGD loop.

Its options are DPTConfig's text-context fields (``--n-text-ctx``, ``--text-ctx-init``,
``--init-std``), turned into a :class:`~dpt_fast.cocoop.config.CoCoOpConfig` by
:func:`dpt_fast.cocoop.build.build_cocoop`. One optimizer group, the context and the meta-net
together at ``text_lr`` (the authors optimise the whole ``prompt_learner`` with one SGD).
In ``--recipe toy`` it takes the toy recipe's values, as every method does (not tuned for
CoCoOp).
"""

from __future__ import annotations

from dpt_fast.methods.base import Method, ParamGroup, RecipeValues

# The authors' configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml: 4 context tokens from
# "a photo of a"; SGD at lr 0.002 over 10 epochs of batch 1, one constant warm-up epoch at
# 1e-5, then cosine (the engine's schedule).
AUTHORS_MODEL = {"n_text_ctx": 4, "text_ctx_init": "a photo of a"}
AUTHORS_RUN = {"batch_size": 1, "epochs": 10, "text_lr": 0.002, "text_warmup_epochs": 1,
               "warmup_lr": 1e-5}

COCOOP = Method(
    name="cocoop",
    description="CoCoOp: text context conditioned on each image by a meta-net (cocoop.py)",
    training="sgd",
    builder="dpt_fast.cocoop.build:build_cocoop",
    model_fields=frozenset({"method", "n_text_ctx", "text_ctx_init", "init_std"}),
    param_groups=(ParamGroup("prompt_learner", ("prompt_learner",), "text_lr",
                             "text_warmup_epochs"),),
    recipes={
        "authors": RecipeValues(run=AUTHORS_RUN, model=AUTHORS_MODEL),
        "dpt_fast": RecipeValues(run=AUTHORS_RUN, model=AUTHORS_MODEL),
    },
)

__all__ = ["COCOOP"]
