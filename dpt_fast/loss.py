"""The authors' training objective (trainers/DPT.py ``forward_backward``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpt_fast.config import DPTConfig
from dpt_fast.output import DPTOutput

GUIDANCE_MAIN_WEIGHT = 0.1  # weight of CE(logits) during the guidance epochs (authors' 0.1)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 logits -> fp32 for the cross-entropy; fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_labels(labels: torch.Tensor, batch_size: int, n_classes: int) -> None:
    if labels.dim() != 1 or labels.shape[0] != batch_size:
        raise ValueError(f"labels must have shape ({batch_size},), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    # The range check reads values back; skip it for device tensors to avoid a sync per step.
    if labels.numel() and labels.device.type == "cpu" and (
        int(labels.min()) < 0 or int(labels.max()) >= n_classes
    ):
        raise ValueError(
            f"labels must lie in [0, {n_classes}), got min {int(labels.min())} "
            f"and max {int(labels.max())}"
        )


def layer_hits(topk_indices: torch.Tensor, labels: torch.Tensor, n_layers: int) -> torch.Tensor:
    """(B, L, K) mask of the slots whose selected class equals the label."""
    return (topk_indices == labels[:, None])[:, None, :].expand(-1, n_layers, -1)


def layer_logit_loss(layer_logits: torch.Tensor, topk_indices: torch.Tensor,
                     labels: torch.Tensor, denominator: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Mean CE of the layer logits of the selected slots whose class is the label.

    layer_logits: (B, L_cavpt, K, C); topk_indices: (B, K); labels: (B,) -> scalar.
    The authors skip the term when no selected class equals its label; here it is then exactly
    0, computed as a masked mean so that no host sync (and no graph break) is needed.
    ``denominator`` replaces the local number of hits (data-parallel training passes the global
    count divided by the number of processes, so averaged gradients equal one big batch's).
    """
    _, n_layers, k, n_classes = layer_logits.shape
    hit = layer_hits(topk_indices, labels, n_layers)  # (B, L, K)
    targets = labels[:, None, None].expand(-1, n_layers, k)
    per_slot = F.cross_entropy(
        _upcast(layer_logits).reshape(-1, n_classes), targets.reshape(-1), reduction="none"
    )
    weight = hit.reshape(-1).to(per_slot.dtype)
    if denominator is None:
        denominator = weight.sum().clamp(min=1.0)
    return (per_slot * weight).sum() / denominator


def dpt_loss(output: DPTOutput, labels: torch.Tensor, epoch: int, config: DPTConfig,
             layer_denominator: torch.Tensor | None = None,
             batch_weight: float | None = None) -> torch.Tensor:
    """The objective of ``config.method`` at ``epoch`` (0-based), docs/DESIGN.md §1.

    Guidance epochs (epoch < guidance_epochs, methods with guidance):
        CE(logits_zeroshot_image) + CE(logits_handcrafted_text) + 0.1 · CE(logits);
    afterwards, and for methods without guidance: CE(logits). Methods with CAVPT add
    α · CE over the layer logits of the selected slots whose class equals the label.
    Cross-entropies of fp16/bf16 logits are computed in fp32. ``batch_weight`` multiplies the
    batch-mean cross-entropies (data-parallel training with unequal shares of a global batch;
    the layer term has its own global ``layer_denominator``).
    """
    check_labels(labels, output.logits.shape[0], output.logits.shape[1])
    labels = labels.long()
    main = F.cross_entropy(_upcast(output.logits), labels)
    zeroshot, handcrafted = output.logits_zeroshot_image, output.logits_handcrafted_text
    guided = config.spec.guidance and epoch < config.guidance_epochs
    if guided and zeroshot is not None and handcrafted is not None:
        loss = (
            F.cross_entropy(_upcast(zeroshot), labels)
            + F.cross_entropy(_upcast(handcrafted), labels)
            + GUIDANCE_MAIN_WEIGHT * main
        )
    else:
        loss = main
    if batch_weight is not None:
        loss = loss * batch_weight
    if output.layer_logits is not None and output.topk_indices is not None:
        loss = loss + config.alpha * layer_logit_loss(
            output.layer_logits, output.topk_indices, labels, layer_denominator
        )
    return loss
