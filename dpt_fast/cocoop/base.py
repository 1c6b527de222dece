"""What the reference and the fast CoCoOp share: construction, parameters, forward, loss, loading.

Subclasses supply the frozen image pass (:meth:`CoCoOpBase.encode_image_frozen`) and the
conditioned logits (:meth:`CoCoOpBase.conditioned_logits`); the rest lives here once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpt_fast.base import DPTBase, _check_classnames, _check_distinct_prompts, _param_dtype
from dpt_fast.clip_interop import ClipGeometry, clip_geometry, run_block, vision_embed, vision_head
from dpt_fast.cocoop import official
from dpt_fast.cocoop.config import CoCoOpConfig
from dpt_fast.cocoop.prompts import CoCoOpPrompts
from dpt_fast.loss import _upcast, check_labels
from dpt_fast.output import DPTOutput
from dpt_fast.state_dict_meta import (
    META_CLASSNAMES,
    META_CONFIG,
    decode_json_tensor,
    load_post_hook,
    load_pre_hook,
    state_dict_post_hook,
)
from dpt_fast.tokenizer import ClipTokenizer


def normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| over the last dimension, as the authors write it (no clamp)."""
    return x / x.norm(dim=-1, keepdim=True)


class CoCoOpBase(nn.Module):
    """Conditional Context Optimization (CoCoOp) on a frozen open_clip CLIP.

    Args:
        clip: an open_clip ``CLIP`` with a ViT image tower; frozen and kept in eval mode.
        classnames: the C class names; "_" is written as a space in prompts.
        config: :class:`CoCoOpConfig`; defaults to the authors' ``vit_b16_c4_ep10_batch1_ctxv1``.
        tokenizer: a :class:`ClipTokenizer`; defaults to CLIP's BPE with the model's context.

    ``forward(images (B, 3, H, W)) -> DPTOutput`` (only ``logits`` (B, C) is set);
    ``loss(output, labels)`` is the cross-entropy. ``state_dict()`` holds ``prompt_learner.ctx``
    and ``prompt_learner.meta_net.*`` plus the class names and config (as for DPT).
    """

    clip: Any  # the frozen open_clip CLIP (its towers are read as attributes)

    def __init__(self, clip: nn.Module, classnames: Sequence[str],
                 config: CoCoOpConfig | None = None, *, tokenizer: ClipTokenizer | None = None):
        super().__init__()
        config = CoCoOpConfig() if config is None else config
        if not isinstance(config, CoCoOpConfig):
            raise TypeError(f"config must be a CoCoOpConfig, got {type(config).__name__}")
        self.classnames = _check_classnames(classnames)
        self.config = config
        self.geometry: ClipGeometry = clip_geometry(clip)
        geo = self.geometry
        clip.requires_grad_(False)
        self.clip = clip.eval()
        tokenizer = tokenizer or ClipTokenizer(geo.context_length)
        if tokenizer.vocab_size != geo.vocab_size:
            raise ValueError(
                f"tokenizer vocabulary ({tokenizer.vocab_size}) does not match the CLIP's token "
                f"embedding ({geo.vocab_size} rows): CoCoOp needs CLIP's BPE tokenizer"
            )
        _check_distinct_prompts(self.classnames, tokenizer)
        self.prompt_learner = CoCoOpPrompts(self.clip.token_embedding, tokenizer, self.classnames,
                                            config, geo.embed_dim, _param_dtype(clip))
        # The run's TrainConfig (a dict) when the model comes from a checkpoint.
        self.train_config: dict | None = None
        self.register_state_dict_post_hook(state_dict_post_hook)
        self.register_load_state_dict_pre_hook(load_pre_hook)
        self.register_load_state_dict_post_hook(load_post_hook)

    # ----------------------------------------------------------------------------- basics
    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def train(self, mode: bool = True) -> CoCoOpBase:
        super().train(mode)
        self.clip.eval()  # the frozen CLIP never trains
        return self

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part: "prompt_learner" (ctx and the meta-net), trained
        together by the authors (SGD, lr 0.002)."""
        return {"prompt_learner": list(self.prompt_learner.parameters())}

    # One definition with DPT: the image checks and ``predict`` read only ``geometry`` and
    # ``forward``.
    check_images: Any = DPTBase.check_images
    predict: Any = DPTBase.predict
    _image_batch: Any = DPTBase._image_batch

    @property
    def uses_frozen_image(self) -> bool:
        """CoCoOp conditions on the frozen CLIP's image feature: ``frozen_features`` can
        supply it (the evaluation's frozen-feature cache)."""
        return True

    # ----------------------------------------------------------------------------- compute
    @torch.no_grad()
    def encode_image_frozen(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP's image features (B, E) (= ``clip.encode_image``)."""
        visual = self.clip.visual
        x = vision_embed(visual, images)
        for block in visual.transformer.resblocks:
            x = run_block(block, x)
        return vision_head(visual, x)

    def conditioned_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of normalised image features (B, E): scale · image · norm(text_b)ᵀ,
        where text_b are the C text features of the prompts conditioned on image b."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor,
                frozen_features: torch.Tensor | None = None) -> DPTOutput:
        """images (B, 3, H, W), CLIP-normalised -> :class:`DPTOutput` with ``logits`` (B, C).

        ``frozen_features``: (B, E) :meth:`encode_image_frozen` of these images, computed
        before (the evaluation's cache); the image pass is then skipped. Same values in, same
        outputs.
        """
        self.check_images(images)
        if frozen_features is None:
            frozen_features = self.encode_image_frozen(images)
        elif tuple(frozen_features.shape) != (images.shape[0], self.geometry.embed_dim):
            raise ValueError(f"frozen_features must have shape ({images.shape[0]}, "
                             f"{self.geometry.embed_dim}), got {tuple(frozen_features.shape)}")
        return DPTOutput(logits=self.conditioned_logits(normalize(frozen_features)))

    def loss(self, output: DPTOutput, labels: torch.Tensor, epoch: int = 0, *,
             layer_denominator: torch.Tensor | None = None,
             batch_weight: float | None = None) -> torch.Tensor:
        """Mean cross-entropy of the logits (the authors' objective; fp16/bf16 logits in fp32).

        ``epoch`` and ``layer_denominator`` are accepted for the trainer's sake and unused;
        ``batch_weight`` multiplies the batch mean (data-parallel shares of a global batch).
        """
        check_labels(labels, output.logits.shape[0], output.logits.shape[1])
        loss = F.cross_entropy(_upcast(output.logits), labels.long())
        return loss * batch_weight if batch_weight is not None else loss

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, clip: nn.Module | None = None,
                        device: torch.device | str | None = None, *,
                        pretrained: str | None = None) -> CoCoOpBase:
        """The model a ``dpt-fast train --method cocoop`` checkpoint holds, in eval mode (see
        :meth:`dpt_fast.base.DPTBase.from_checkpoint` for the arguments)."""
        from dpt_fast import checkpoint as ckpt
        from dpt_fast.backbone import check_activation, load_clip

        tensors, meta = ckpt.read_checkpoint(path)
        run = meta["config"]
        state = ckpt.model_state(tensors)
        if clip is None:
            clip = load_clip(run["backbone"], pretrained or run["pretrained"],
                             torch.device(device or "cpu"))
        elif device is not None:
            clip = clip.to(device)
        check_activation(meta.get("clip"), clip, str(path))
        # The model's own config, as its state_dict records it (the run's DPTConfig holds
        # the options it was built from).
        model = cls(clip, decode_json_tensor(state[META_CLASSNAMES]),
                    CoCoOpConfig(**decode_json_tensor(state[META_CONFIG])))
        model.load_state_dict(state)
        model.train_config = run
        return model.eval()

    def load_official_checkpoint(self, directory: str | os.PathLike,
                                 epoch: int | None = None) -> None:
        """Load ``ctx`` and the meta-net saved by the authors' Dassl trainer
        (``directory/prompt_learner/model-best.pth.tar`` or ``model.pth.tar-<epoch>``), with
        ``weights_only=True``; fp16 tensors are cast. ``token_prefix``/``token_suffix`` are
        ignored, as the authors' loader ignores them; any other missing or unexpected key, or a
        shape mismatch, raises before anything is copied."""
        official.load_official_checkpoint(self.prompt_learner, directory, epoch)
