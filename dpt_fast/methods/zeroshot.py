"""Zero-shot CLIP as a method: the hand-crafted classifier of :mod:`dpt_fast.zero_shot`.

It trains nothing and reads no training image: a sweep runs it once per dataset (shots 0, the
first seed), and its runs make the report's zero-shot rows (the figure's marker at 0 shots).
"""

from __future__ import annotations

from dpt_fast.methods.base import Method

ZEROSHOT = Method(
    name="zeroshot", description="zero-shot CLIP: hand-crafted prompts, no training",
    training="none", builder="dpt_fast.zero_shot:build_zero_shot",
    model_fields=frozenset({"method", "template"}), uses_shots=False)

__all__ = ["ZEROSHOT"]
