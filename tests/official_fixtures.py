"""Checkpoints in the authors' format (Dassl's trainer), written from a DPT's prompts."""

from __future__ import annotations

import os

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

from dpt_fast.official import CAVPT_PART, TEXT_PART, VISUAL_PART
from dpt_fast.reference import DPT


class _DasslWarmup(LRScheduler):
    """Dassl's ConstantWarmupScheduler, in its structure: a successor scheduler as attribute."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]


def _write_official(model: DPT, directory, filename="model-best.pth.tar", dtype=torch.float16,
                    n_classes=None):
    """Write the model's prompts as the authors' Dassl trainer saves them."""

    def save(part, state):
        # As Dassl saves it: beside the weights, the optimizer's and the warm-up scheduler's
        # state; the latter holds the cosine scheduler (and its optimizer) as objects.
        param = torch.nn.Parameter(torch.zeros(2))
        optimizer = torch.optim.SGD([param], lr=0.002, momentum=0.9)
        scheduler = _DasslWarmup(optimizer, CosineAnnealingLR(optimizer, 50), 1, 1e-5)
        os.makedirs(directory / part, exist_ok=True)
        torch.save({"state_dict": state, "epoch": 5, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "val_result": 0.0},
                   directory / part / filename)

    text = model.text_prompts
    save(TEXT_PART, {"ctx": text.ctx.detach().to(dtype), "token_prefix": text.token_prefix,
                     "token_suffix": text.token_suffix})
    save(VISUAL_PART, {"ctx": model.visual_prompts.ctx.detach().to(dtype)})
    cavpt = {}
    for i, layer in enumerate(model.cavpt.layers):
        cavpt[f"meta_nets.{i}.weight"] = layer.query_proj.weight
        cavpt[f"meta_nets.{i}.bias"] = layer.query_proj.bias
        cavpt[f"attns.{i}.qmlp.weight"] = layer.attn_q.weight
        cavpt[f"attns.{i}.kmlp.weight"] = layer.attn_k.weight
        cavpt[f"attns.{i}.vmlp.weight"] = layer.attn_v.weight
        cavpt[f"lns.{i}.weight"] = layer.norm_logits.weight
        cavpt[f"lns.{i}.bias"] = layer.norm_logits.bias
        cls = layer.classifier.weight
        cavpt[f"classfiers.{i}.weight"] = cls if n_classes is None else cls[:n_classes]
        cavpt[f"lns2.{i}.weight"] = layer.norm_prompt.weight
        cavpt[f"lns2.{i}.bias"] = layer.norm_prompt.bias
    cavpt = {k: v.detach().to(dtype) for k, v in cavpt.items()}
    cavpt["ctx"] = torch.stack([layer.ctx.detach() for layer in model.cavpt.layers]).to(dtype)
    save(CAVPT_PART, cavpt)
