"""Float64 gradcheck of every trainable part of the reference DPT on a tiny CLIP."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from dpt_fast.config import DPTConfig
from dpt_fast.reference import DPT
from dpt_fast.testing import tiny_clip


def _tiny_double_clip():
    return tiny_clip(image_size=16, patch_size=8, vision_layers=2, vision_width=16,
                     vision_head_width=8, text_layers=1, text_width=16, text_heads=2,
                     embed_dim=8).double()


def _freeze_cavpt_token_inputs(model: DPT, images: torch.Tensor) -> None:
    """Hold each CAVPT layer's image-token input at its value at the checked point.

    CAVPT reads the image tokens through ``detach()`` (as the authors do), so the analytical
    gradient treats them as constants while finite differences would see them move. Feeding
    the layers constant tokens is exactly the function whose derivative ``detach`` defines.
    """
    if model.cavpt is None:
        return
    recorded: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args, i=i: recorded.__setitem__(i, args[0].detach().clone())
        )
        for i, layer in enumerate(model.cavpt.layers)
    ]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    for i, layer in enumerate(model.cavpt.layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: (recorded[i], *args[1:]))


@pytest.mark.parametrize(
    "config",
    [
        DPTConfig(n_text_ctx=2, n_visual_ctx=2, cavpt_start_layer=2, cavpt_top_k=2,
                  cavpt_n_ctx=2, cavpt_attn_dim=4),
        DPTConfig(n_text_ctx=2, n_visual_ctx=2, cavpt_start_layer=1, cavpt_top_k=3,
                  cavpt_n_ctx=1, cavpt_attn_dim=3, class_specific_ctx=True,
                  class_token_position="middle"),
        DPTConfig(method="vlp", n_text_ctx=3, n_visual_ctx=1, class_token_position="front"),
        DPTConfig(method="vpt", n_visual_ctx=2),
    ],
    ids=["dpt", "dpt-csc-middle-all-layers", "vlp-front", "vpt"],
)
def test_gradcheck_all_trainable_parameters(config):
    torch.manual_seed(0)
    model = DPT(_tiny_double_clip(), ["cat", "dog", "sea_lion"], config)
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        first = model(images)
    # Labels that hit a selected class, so the layer-logit term takes part.
    labels = first.topk_indices[:, 0] if first.topk_indices is not None else torch.tensor([0, 2])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = tuple(model.get_parameter(n).detach().clone().requires_grad_() for n in names)
    _freeze_cavpt_token_inputs(model, images)

    def loss_of(*values):
        out = functional_call(model, dict(zip(names, values, strict=True)), (images,))
        return model.loss(out, labels, epoch=0)

    assert torch.autograd.gradcheck(loss_of, params, eps=1e-6, atol=1e-5, rtol=1e-4,
                                    fast_mode=True)
