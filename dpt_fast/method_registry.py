"""The registry of methods: each method's name, where its ``Method`` object lives and a
one-line description. Plain data, no imports: the config checks a method's name against it and
the command line lists its choices without importing torch (:mod:`dpt_fast.methods` reads it
and imports a method's module only when the method is asked for).

Adding a method: one module holding its ``Method`` object, its tests, and one line here
(docs/methods.md, "Adding a method"). The order is the paper's (baselines first): reports and
figures list methods in it.
"""

from __future__ import annotations

# name -> ("module:attribute" of its Method, one-line description)
REGISTRY: dict[str, tuple[str, str]] = {
    "zeroshot": ("dpt_fast.methods.zeroshot:ZEROSHOT",
                 "zero-shot CLIP: hand-crafted prompts, no training"),
    "linear_probe": ("dpt_fast.methods.linear_probe:LINEAR_PROBE",
                     "linear-probe CLIP: logistic regression on frozen image features (lpclip)"),
    "coop": ("dpt_fast.methods.dpt_presets:COOP", "CoOp: learned text context"),
    "cocoop": ("dpt_fast.methods.cocoop:COCOOP",
               "CoCoOp: text context conditioned on each image by a meta-net"),
    "vpt": ("dpt_fast.methods.dpt_presets:VPT",
            "VPT-deep: learned visual prompts, hand-crafted text classifier"),
    "vlp": ("dpt_fast.methods.dpt_presets:VLP",
            "VLP: text context + deep visual prompts, guidance objective"),
    "dpt": ("dpt_fast.methods.dpt_presets:DPT",
            "DPT: text context + deep visual prompts + class-aware visual prompts"),
}
METHOD_NAMES: tuple[str, ...] = tuple(REGISTRY)


def check_method_name(name: str) -> None:
    """Raise ``ValueError`` naming the valid methods when ``name`` is not registered."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r} (valid: {', '.join(METHOD_NAMES)})")
