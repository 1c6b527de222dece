"""What the reference and the fast DPT share: construction, parameters, outputs, loss, loading.

Subclasses implement the two encoders (:meth:`DPTBase.encode_learned_text` and
:meth:`DPTBase.encode_image_prompted`); everything around them — zero-shot class selection,
logits, the objective, ``state_dict`` and checkpoint loading — lives here once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from dpt_fast import official
from dpt_fast.clip_interop import (
    ClipGeometry,
    OpenClipModule,
    clip_geometry,
    run_block,
    vision_embed,
    vision_head,
)
from dpt_fast.config import DPTConfig
from dpt_fast.loss import dpt_loss
from dpt_fast.output import DPTOutput
from dpt_fast.prompts import (
    ClassAwarePrompts,
    DeepVisualPrompts,
    TextPrompts,
    prompt_class_name,
)
from dpt_fast.state_dict_meta import (
    META_CLASSNAMES,
    decode_json_tensor,
    load_post_hook,
    load_pre_hook,
    state_dict_post_hook,
)
from dpt_fast.tokenizer import ClipTokenizer
from dpt_fast.zero_shot import zero_shot_classifier

if TYPE_CHECKING:
    from torch.nn.modules.module import _IncompatibleKeys
    from typing_extensions import Self


def _check_classnames(classnames: Sequence[str]) -> list[str]:
    if isinstance(classnames, str) or not isinstance(classnames, Sequence):
        raise TypeError(f"classnames must be a list of strings, got {type(classnames).__name__}")
    names = list(classnames)
    if not names:
        raise ValueError("classnames is empty: DPT needs at least one class")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"classnames[{i}] must be a non-empty string, got {name!r}")
    return names


def _check_distinct_prompts(names: list[str], tokenizer: ClipTokenizer) -> None:
    """Refuse class names that reach the text encoder as the same tokens: CLIP's tokenizer
    lower-cases, collapses white space and fixes text encoding, and "_" is written as a space,
    so "Red_Plain  square" and "red plain square" are one class to the model."""
    seen: dict[tuple[int, ...], int] = {}
    for i, name in enumerate(names):
        key = tuple(tokenizer.encode(prompt_class_name(name)))
        if key in seen:
            j = seen[key]
            raise ValueError(
                f"classnames[{j}] {names[j]!r} and classnames[{i}] {name!r} give the same "
                "prompt tokens (CLIP's tokenizer ignores case, repeated spaces and '_'): "
                "classes must be distinguishable"
            )
        seen[key] = i


def _param_dtype(clip: nn.Module) -> torch.dtype:
    # Prompts are trained in fp32 even when the CLIP is fp16/bf16: the authors' fp16 parameters
    # under plain SGD lose small updates. Low-precision compute comes from autocast instead.
    dtype = next(p.dtype for p in clip.parameters() if p.is_floating_point())
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _normalize(x: torch.Tensor) -> torch.Tensor:
    # x / ||x||, as the authors write it (F.normalize would clamp the norm).
    return x / x.norm(dim=-1, keepdim=True)


class DPTBase(nn.Module):
    """Dual-modality Prompt Tuning on a frozen open_clip CLIP.

    Args:
        clip: an open_clip ``CLIP`` with a ViT image tower (e.g.
            ``open_clip.create_model("ViT-B-16", pretrained=...)``). It is frozen (no parameter
            of it requires grad) and kept in eval mode; the prompts are created on its device.
        classnames: the C class names; "_" is written as a space in prompts.
        config: :class:`DPTConfig`; defaults to the authors' DPT.
        tokenizer: a :class:`ClipTokenizer`; defaults to CLIP's BPE with the model's context.

    ``forward(images (B, 3, H, W)) -> DPTOutput``; ``loss(output, labels, epoch)``.
    ``state_dict()`` holds the prompt parameters (not the CLIP) plus two metadata entries (class
    names and config as UTF-8 JSON bytes); ``load_state_dict`` with ``strict=True`` (the
    default) refuses a state_dict of other classes or another config and names the difference.
    """

    handcrafted_text_features: torch.Tensor  # a buffer: (C, E), see __init__
    _load_prefix: str  # this model's prefix in the state_dict being loaded (load_pre_hook)

    def __init__(self, clip: nn.Module, classnames: Sequence[str],
                 config: DPTConfig | None = None, *, tokenizer: ClipTokenizer | None = None):
        super().__init__()
        config = DPTConfig() if config is None else config
        if not isinstance(config, DPTConfig):
            raise TypeError(f"config must be a DPTConfig, got {type(config).__name__}")
        self.classnames = _check_classnames(classnames)
        self.config = config
        self.geometry: ClipGeometry = clip_geometry(clip)
        geo, spec = self.geometry, config.spec

        clip.requires_grad_(False)
        self.clip: OpenClipModule = clip.eval()

        if spec.class_aware_prompts:
            start = config.cavpt_start_layer or geo.vision_layers
            if start > geo.vision_layers:
                raise ValueError(
                    f"DPTConfig.cavpt_start_layer={start} but the image tower has only "
                    f"{geo.vision_layers} layers (valid: 1..{geo.vision_layers})"
                )
            self.cavpt_start = start - 1  # 0-based first CAVPT layer
            n_deep = self.cavpt_start
        else:
            self.cavpt_start = geo.vision_layers
            n_deep = geo.vision_layers
        self.top_k = min(config.cavpt_top_k, len(self.classnames))

        tokenizer = tokenizer or ClipTokenizer(geo.context_length)
        if tokenizer.vocab_size != geo.vocab_size:
            raise ValueError(
                f"tokenizer vocabulary ({tokenizer.vocab_size}) does not match the CLIP's token "
                f"embedding ({geo.vocab_size} rows): DPT needs CLIP's BPE tokenizer"
            )
        _check_distinct_prompts(self.classnames, tokenizer)
        param = next(p for p in clip.parameters() if p.is_floating_point())
        device, dtype = param.device, _param_dtype(clip)

        # (C, E) normalised text features of the hand-crafted template, fixed: zero-shot
        # CLIP's classifier (the one function every method shares).
        self.register_buffer("handcrafted_text_features",
                             zero_shot_classifier(clip, self.classnames, config.template,
                                                  tokenizer),
                             persistent=False)

        self.text_prompts = (
            TextPrompts(cast(nn.Embedding, clip.token_embedding), tokenizer, self.classnames,
                        config, dtype)
            if spec.text_prompts else None
        )
        self.visual_prompts = (
            DeepVisualPrompts(n_deep, config.n_visual_ctx, geo.vision_width, config.init_std,
                              device, dtype)
            if spec.deep_visual_prompts and n_deep > 0 else None
        )
        self.cavpt = (
            ClassAwarePrompts(geo.vision_layers - self.cavpt_start, geo.embed_dim,
                              geo.vision_width, len(self.classnames), config, device, dtype)
            if spec.class_aware_prompts else None
        )
        # The run's TrainConfig (a dict) when the model comes from a checkpoint.
        self.train_config: dict[str, Any] | None = None
        self.register_state_dict_post_hook(state_dict_post_hook)
        self.register_load_state_dict_pre_hook(load_pre_hook)
        self.register_load_state_dict_post_hook(load_post_hook)

    # ----------------------------------------------------------------------------- basics
    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def train(self, mode: bool = True) -> Self:
        super().train(mode)
        self.clip.eval()  # the frozen CLIP never trains (no patch dropout, no dropout)
        return self

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part: "text_prompts", "visual_prompts", "cavpt".

        The authors train them with separate optimizers (text: lr 0.002, 1 warm-up epoch;
        visual and CAVPT: lr 0.01); absent parts are left out.
        """
        parts = {"text_prompts": self.text_prompts, "visual_prompts": self.visual_prompts,
                 "cavpt": self.cavpt}
        return {name: list(m.parameters()) for name, m in parts.items() if m is not None}

    def check_images(self, images: torch.Tensor) -> None:
        expected = (3, *self.geometry.image_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or \
                tuple(images.shape[1:]) != expected:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
            raise ValueError(
                f"images must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}) for "
                f"this CLIP, got {shape}: resize/crop to {expected[1]}x{expected[2]}"
            )
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor (normalised pixels), "
                             f"got {images.dtype}")

    @property
    def uses_frozen_image(self) -> bool:
        """Whether ``forward`` needs the frozen CLIP's feature of each image (CAVPT's class
        selection, the guidance terms): what ``frozen_features`` can supply."""
        spec = self.config.spec
        return spec.class_aware_prompts or spec.guidance

    # ----------------------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_image_frozen(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP's image features (B, E) of unprompted images (= encode_image)."""
        visual = self.clip.visual
        x = vision_embed(visual, images)
        for block in visual.transformer.resblocks:
            x = run_block(block, x)
        return vision_head(visual, x)

    def encode_learned_text(self) -> torch.Tensor:
        """Text features (C, E) of the learned prompts, unnormalised."""
        raise NotImplementedError

    def encode_image_prompted(
        self, images: torch.Tensor, class_text: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompted image features (B, E) and CAVPT layer logits (B, L_cavpt, K, C) or None.

        class_text: (B, K, E) learned text features of each image's selected classes (CAVPT).
        """
        raise NotImplementedError

    # ----------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor,
                frozen_features: torch.Tensor | None = None) -> DPTOutput:
        """images (B, 3, H, W), CLIP-normalised -> :class:`DPTOutput`.

        ``frozen_features``: (B, E) :meth:`encode_image_frozen` of these images, computed
        before (an evaluation cache: the frozen CLIP's features of an image never change); the
        unprompted pass is then skipped. Same values in, same outputs.
        """
        self.check_images(images)
        spec = self.config.spec
        scale = self.clip.logit_scale.exp()
        handcrafted = self.handcrafted_text_features

        frozen = None
        if self.uses_frozen_image:
            if frozen_features is None:
                frozen_features = self.encode_image_frozen(images)
            elif tuple(frozen_features.shape) != (images.shape[0], handcrafted.shape[1]):
                raise ValueError(f"frozen_features must have shape ({images.shape[0]}, "
                                 f"{handcrafted.shape[1]}), got {tuple(frozen_features.shape)}")
            frozen = _normalize(frozen_features)  # (B, E), no grad
        text = self.encode_learned_text() if spec.text_prompts else None  # (C, E)
        text_n = _normalize(text) if text is not None else handcrafted

        indices = class_text = None
        if spec.class_aware_prompts:
            # CAVPT methods learn text prompts, and uses_frozen_image holds for them
            assert frozen is not None and text is not None
            with torch.no_grad():
                selection = scale * frozen @ handcrafted.t()  # (B, C)
                indices = selection.topk(self.top_k, dim=-1).indices  # (B, K), best first
            class_text = text[indices]  # (B, K, E), carries the text prompts' gradient
        image, layer_logits = self.encode_image_prompted(images, class_text)
        image_n = _normalize(image)

        out = DPTOutput(logits=scale * image_n @ text_n.t(), layer_logits=layer_logits,
                        topk_indices=indices)
        if spec.guidance:
            assert frozen is not None  # uses_frozen_image holds for guided methods
            out.logits_zeroshot_image = scale * frozen @ text_n.t()
            out.logits_handcrafted_text = scale * image_n @ handcrafted.t()
        return out

    def loss(self, output: DPTOutput, labels: torch.Tensor, epoch: int, *,
             layer_denominator: torch.Tensor | None = None,
             batch_weight: float | None = None) -> torch.Tensor:
        """The authors' objective for ``epoch`` (0-based); see :func:`dpt_fast.loss.dpt_loss`.

        ``layer_denominator`` and ``batch_weight`` are for data-parallel training (see
        ``dpt_loss``).
        """
        return dpt_loss(output, labels, epoch, self.config, layer_denominator, batch_weight)

    # ----------------------------------------------------------------------------- using
    @torch.no_grad()
    def predict(self, images: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        """Class probabilities (B, C), the softmax of the logits, in float32.

        ``images``: a (B, 3, H, W) tensor of CLIP-normalised pixels, or a sequence of PIL
        images, which are resized, centre-cropped and normalised as for evaluation. A model in
        training mode is switched to eval mode for the call and back.
        """
        if not isinstance(images, torch.Tensor):
            images = self._image_batch(images)
        device = self.handcrafted_text_features.device
        training = self.training
        if training:
            self.eval()
        try:
            logits = self(images.to(device)).logits
        finally:
            if training:
                self.train()
        return logits.float().softmax(dim=-1)

    def _image_batch(self, images: Sequence[Any]) -> torch.Tensor:
        """(B, 3, H, W) evaluation tensors of PIL images."""
        from PIL import Image

        from dpt_fast.data.loading import build_transforms

        if isinstance(images, (str, bytes, os.PathLike)) or not isinstance(images, Sequence):
            raise TypeError("images must be a (B, 3, H, W) tensor or a sequence of PIL images, "
                            f"got {type(images).__name__}")
        transform = build_transforms(train=False, image_size=self.geometry.image_size[0])
        batch = []
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"images[{i}] must be a PIL image, got {type(image).__name__} "
                                "(open files with PIL.Image.open)")
            batch.append(transform(image.convert("RGB")))
        if not batch:
            raise ValueError("images is empty")
        return torch.stack(batch)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], clip: nn.Module | None = None,
                        device: torch.device | str | None = None, *,
                        pretrained: str | None = None) -> Self:
        """The model a ``dpt-fast train`` checkpoint holds: its class names, its
        :class:`DPTConfig` and its prompts, in eval mode.

        Args:
            path: a ``checkpoint-*.safetensors`` of ``dpt-fast train``.
            clip: the CLIP to put the prompts on; None builds the one the checkpoint records
                (its backbone and weights; OpenAI's weights on a QuickGELU model).
            device: where the model goes; None keeps ``clip``'s device (CPU when built here).
            pretrained: weights to build the CLIP with instead of the recorded ones (an
                open_clip tag or a file, e.g. a local copy of the recorded weights).

        ``model.train_config`` is the run's TrainConfig as a dict. A fast model's checkpoint
        loads into the reference model and back: both hold the same tensors.

        Raises:
            FileNotFoundError, ValueError: a missing or foreign file, or a ``clip`` the
                prompts do not fit (the message names the difference).
        """
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
        model = cls(clip, decode_json_tensor(state[META_CLASSNAMES]), DPTConfig(**run["model"]))
        model.load_state_dict(state)
        model.train_config = run
        return model.eval()

    # ----------------------------------------------------------------------------- loading
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> _IncompatibleKeys:
        """Load prompts saved by :meth:`state_dict`.

        With ``strict=True`` (also when DPT sits inside the module being loaded) a state_dict of
        other classes or of another config is refused with an error naming the difference.
        ``strict=False`` loads the tensors whose names and shapes fit this model and returns
        the rest: tensors of another shape (and the description of the difference) among
        ``unexpected_keys``, tensors the state_dict lacks among ``missing_keys``.

        A state_dict holding NaN or infinite values (a run that diverged) is always refused,
        with a ``ValueError`` naming the tensor.
        """
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def load_official_checkpoint(self, directory: str | os.PathLike[str], epoch: int | None = None,
                                 *, load_layer_classifiers: bool = True) -> None:
        """Load prompts saved by the authors' Dassl trainer (``fanrena/DPT``).

        Reads ``directory/<part>/model-best.pth.tar`` (or ``model.pth.tar-<epoch>``) for the
        parts this method has, with ``weights_only=True``; fp16 tensors are cast. Any missing
        file, missing or unexpected key, or shape mismatch raises before anything is copied.
        ``load_layer_classifiers=False`` keeps this model's CAVPT layer classifiers, as the
        authors' loader does, so prompts trained on other classes can be evaluated here.
        """
        official.load_official_checkpoint(self, directory, epoch, load_layer_classifiers)
