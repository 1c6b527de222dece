"""Model FLOPs of one DPT training step or evaluation pass, counted from the shapes.

Convention (the count is the same for every implementation):

* FLOPs = 2 · multiply-adds of every matmul (linear layers, patch embedding, attention
  ``q kᵀ`` and ``p v``); norms, softmax, activations and elementwise work are not counted.
* The work counted is the **reference's** (``dpt_fast.reference.DPT``): the image tower runs
  twice (zero-shot pass on the N image tokens; prompted pass with the layer's prompt tokens
  concatenated, N + P tokens in deep-prompt layers, N + K in CAVPT layers, every layer in full);
  the text tower runs all T (77) positions of each of the C learned prompts, attention dense
  (the causal mask's skipped half still counts). The fast model skips part of that work (shared
  prefix, truncated text, CLS-only last layer, text cache), so its TFLOP/s is "useful work per
  second": reference FLOPs / fast time.
* Also counted: the CAVPT modules (query/key/value projections, their attention, classifier),
  the image and text projections, and the (B, C) logit matmuls. The hand-crafted text features
  are computed once at construction and are not counted.
* Backward = 2 × forward for the parts that need gradients (text tower, prompted image pass,
  CAVPT, logits), the usual "6 · params · tokens" convention; the zero-shot image pass runs
  without autograd and counts forward only. (The CLIP weights are frozen, so the real backward
  skips the weight gradients: this overstates the backward of the frozen towers by up to 2×.)
* An evaluation pass counts the forward only, text tower included (the reference recomputes it
  every batch; the fast model's cache is part of what makes it fast).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    """The shapes the count needs; read them off a model with :func:`sizes_of`."""

    vision_layers: int
    vision_width: int
    vision_mlp: int
    patch_size: int
    image_tokens: int  # N = patches + 1 (CLS)
    text_layers: int
    text_width: int
    text_mlp: int
    context_length: int  # T
    embed_dim: int  # E
    n_classes: int  # C
    n_deep: int  # layers with deep visual prompts
    n_visual_ctx: int  # P
    n_cavpt: int  # CAVPT layers
    top_k: int  # K classes selected per image
    cavpt_n_ctx: int
    cavpt_attn_dim: int


def sizes_of(model) -> Sizes:
    """Sizes of a ``DPT`` (reference or fast) built on an open_clip CLIP."""
    clip, geo, cfg = model.clip, model.geometry, model.config
    visual = clip.visual
    patch = visual.conv1.kernel_size[0]
    n_deep = model.visual_prompts.n_layers if model.visual_prompts is not None else 0
    n_cavpt = len(model.cavpt.layers) if model.cavpt is not None else 0
    return Sizes(
        vision_layers=geo.vision_layers, vision_width=geo.vision_width,
        vision_mlp=visual.transformer.resblocks[0].mlp.c_fc.out_features, patch_size=patch,
        image_tokens=(geo.image_size[0] // patch) * (geo.image_size[1] // patch) + 1,
        text_layers=len(clip.transformer.resblocks), text_width=geo.text_width,
        text_mlp=clip.transformer.resblocks[0].mlp.c_fc.out_features,
        context_length=geo.context_length, embed_dim=geo.embed_dim, n_classes=model.n_classes,
        n_deep=n_deep, n_visual_ctx=cfg.n_visual_ctx, n_cavpt=n_cavpt, top_k=model.top_k,
        cavpt_n_ctx=cfg.cavpt_n_ctx, cavpt_attn_dim=cfg.cavpt_attn_dim,
    )


def block_macs(tokens: int, width: int, mlp: int) -> int:
    """Multiply-adds of one pre-LN transformer block over one sequence of ``tokens``:
    QKV + output projections (4·n·w²), q kᵀ and p v (2·n²·w), the MLP (2·n·w·mlp)."""
    return 4 * tokens * width**2 + 2 * tokens**2 * width + 2 * tokens * width * mlp


def vision_pass_macs(s: Sizes, extra_tokens: list[int]) -> int:
    """One image through the tower, ``extra_tokens[i]`` prompt tokens appended at layer i."""
    embed = (s.image_tokens - 1) * 3 * s.patch_size**2 * s.vision_width
    layers = sum(block_macs(s.image_tokens + e, s.vision_width, s.vision_mlp)
                 for e in extra_tokens)
    return embed + layers + s.vision_width * s.embed_dim


def cavpt_layer_macs(s: Sizes) -> int:
    """One CAVPT module, one image: K class queries over N + cavpt_n_ctx keys."""
    w, a, k = s.vision_width, s.cavpt_attn_dim, s.top_k
    keys = s.image_tokens + s.cavpt_n_ctx
    return (k * s.embed_dim * w  # query_proj
            + k * w * a + keys * w * a  # attn_q, attn_k
            + k * keys * a + k * keys * w  # q kᵀ, p v
            + k * w * w  # attn_v
            + k * w * s.n_classes)  # classifier


def text_macs(s: Sizes) -> int:
    """The reference text tower: C prompts × T positions, every layer, then the projection."""
    per_prompt = s.text_layers * block_macs(s.context_length, s.text_width, s.text_mlp)
    return s.n_classes * (per_prompt + s.text_width * s.embed_dim)


def forward_flops(s: Sizes, batch: int) -> tuple[float, float]:
    """(FLOPs without autograd, FLOPs that need a backward) of one forward over ``batch``."""
    zero_shot = vision_pass_macs(s, [0] * s.vision_layers)
    extra = [s.n_visual_ctx] * s.n_deep + [0] * (s.vision_layers - s.n_deep - s.n_cavpt)
    extra += [s.top_k] * s.n_cavpt
    prompted = vision_pass_macs(s, extra) + s.n_cavpt * cavpt_layer_macs(s)
    selection = s.embed_dim * s.n_classes  # zero-shot class selection, no grad
    logits = 3 * s.embed_dim * s.n_classes  # logits + the two guidance logits
    no_grad = batch * (zero_shot + selection)
    with_grad = batch * (prompted + logits) + text_macs(s)
    return 2.0 * no_grad, 2.0 * with_grad


def train_step_flops(s: Sizes, batch: int) -> float:
    """Model FLOPs of forward + loss + backward (backward = 2 × the parts with gradients)."""
    no_grad, with_grad = forward_flops(s, batch)
    return no_grad + 3.0 * with_grad


def eval_flops(s: Sizes, batch: int, n_batches: int = 1) -> float:
    """Model FLOPs of ``n_batches`` evaluation forwards (text tower counted every batch)."""
    return n_batches * sum(forward_flops(s, batch))
