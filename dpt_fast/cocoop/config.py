"""Typed configuration of a CoCoOp model (Zhou et al., CVPR 2022, "Conditional Prompt Learning").

Defaults are the authors' ``configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml``
(``KaiyangZhou/CoOp``): 4 context tokens initialised from the words "a photo of a", and the
meta-net ``linear1 -> ReLU -> linear2`` whose hidden width is the image feature size / 16.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from dpt_fast.config_fields import INIT_ONLY, config_diff, with_roles

# The authors' meta-net narrows the image feature by this factor (``vis_dim // 16``).
AUTHORS_META_NET_REDUCTION = 16


@dataclass
class CoCoOpConfig:
    """Configuration of :class:`dpt_fast.CoCoOp` and :class:`dpt_fast.reference.CoCoOp`.

    Invalid values raise ``ValueError`` naming the field when the config is created.
    """

    n_ctx: int = 4  # learnable context tokens (ignored when ctx_init is set: one per word)
    ctx_init: str = "a photo of a"  # words that initialise the context; "" = random init
    meta_net_reduction: int = AUTHORS_META_NET_REDUCTION  # meta-net hidden width = E // this
    init_std: float = with_roles(0.02, INIT_ONLY)  # std of the normal init of a random context

    def __post_init__(self) -> None:
        if not isinstance(self.ctx_init, str):
            raise ValueError(f"CoCoOpConfig.ctx_init must be a string, got {self.ctx_init!r}")
        if not self.ctx_init and self.n_ctx < 1:
            raise ValueError(f"CoCoOpConfig.n_ctx must be >= 1, got {self.n_ctx}")
        if self.meta_net_reduction < 1:
            raise ValueError("CoCoOpConfig.meta_net_reduction must be >= 1, "
                             f"got {self.meta_net_reduction}")
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ValueError(f"CoCoOpConfig.init_std must be a finite number > 0, "
                             f"got {self.init_std}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_fields(self) -> dict:
        """The fields that define the learned tensors (all of them: CoCoOp has no loss-only
        fields)."""
        return self.to_dict()

    def differing_model_fields(self, saved: dict,
                               ignore: frozenset[str] = frozenset()) -> list[str]:
        """The fields (sorted) whose value in ``saved``, a state_dict's ``model_fields()``,
        differs from this config's; init-only fields and those in ``ignore`` never count."""
        changes = config_diff(CoCoOpConfig, saved, self.model_fields(),
                              skip_roles=(INIT_ONLY,), skip=ignore)
        return [change.name for change in changes]
