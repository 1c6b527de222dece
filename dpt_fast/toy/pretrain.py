"""Contrastive pretraining of the toy CLIP on captioned toy-world images.

``python -m dpt_fast.toy.pretrain --out dpt_fast/toy_clip/toy_clip.safetensors`` (all defaults:
seed 0, 6000 steps of 64, one CPU thread) is the recipe of the shipped weights. The data stream
is reproducible from the seed, and the training runs with deterministic kernels at a fixed
thread count, so a rerun with the same torch build on the same kind of CPU gives the same file
bit for bit (the same SHA-256). Another CPU (other SIMD kernels), torch build or thread count
rounds differently and gives other, statistically equivalent weights, which load with
``expected_sha256=None``.

Each step draws a fresh batch of scenes from the seeded generator. Each caption names the
shape and, at random, the colour, the texture and the position (each half of the time), in one
of a few sentence forms. The objective is CLIP's symmetric cross-entropy with multi-positive
targets: a caption counts as a match for every image in the batch it truly describes ("a red
circle" matches all red circles).

Only the first ``TEXT_TRAIN_LENGTH`` text positions are run during pretraining: captions are
shorter, and with CLIP's causal mask and end-of-text pooling the features are identical to the
full 77-position forward, at a fifth of the cost. Only the embedding rows of the toy
vocabulary are trained (see ``model.py`` for the storage format).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpt_fast.clip_interop import OpenClipModule
from dpt_fast.data.loading import CLIP_MEAN, CLIP_STD
from dpt_fast.tokenizer import ClipTokenizer
from dpt_fast.toy_clip.model import (
    WEIGHTS_PATH,
    build_toy_clip,
    load_toy_clip,
    save_toy_weights,
    token_ids,
)
from dpt_fast.toy_clip.world import (
    COLOURS,
    POSITIONS,
    SHAPES,
    TEXTURES,
    Scene,
    render,
    sample_scene,
)

# Probability that a caption names each attribute (the shape is always named).
MENTION_COLOUR = 0.5
MENTION_TEXTURE = 0.5
MENTION_POSITION = 0.5
SENTENCE_FORMS = ("{}", "{}.", "a photo of {}.")
TEXT_TRAIN_LENGTH = 16  # text positions run in pretraining (captions need at most 12)
LOG_EVERY = 100


@dataclass
class PretrainConfig:
    seed: int = 0
    steps: int = 6000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    threads: int = 1  # CPU threads: part of the recipe (it changes the rounding)
    init: str = ""  # start from these compact weights (a stage-2 run), "" = from scratch
    mention_colour: float = MENTION_COLOUR  # probability that a caption names the colour
    mention_texture: float = MENTION_TEXTURE  # probability that a caption names the texture
    checkpoint_every: int = 0  # also write <out>.step<N> every N steps (0: only the end)


def _attributes(scene: Scene) -> tuple[int, int, int, int]:
    return (SHAPES.index(scene.shape), list(COLOURS).index(scene.colour),
            TEXTURES.index(scene.texture), list(POSITIONS).index(scene.position))


def _to_tensor(images: list) -> torch.Tensor:
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).float() / 255.0
    pixels = pixels.permute(0, 3, 1, 2)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def sample_batch(rng: np.random.Generator, size: int, tokenizer: ClipTokenizer,
                 mention_colour: float = MENTION_COLOUR,
                 mention_texture: float = MENTION_TEXTURE
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (B, 3, 64, 64) CLIP-normalised, caption tokens (B, 77) and the (B, B) float
    matrix of which caption j truly describes image i."""
    scenes = [sample_scene(rng) for _ in range(size)]
    images = [render(scene, rng) for scene in scenes]
    mentions = rng.random((size, 3)) < (mention_colour, mention_texture, MENTION_POSITION)
    forms = rng.integers(len(SENTENCE_FORMS), size=size)
    captions = [SENTENCE_FORMS[f].format(s.caption(tuple(m)))
                for s, m, f in zip(scenes, mentions, forms, strict=True)]
    attrs = torch.tensor([_attributes(s) for s in scenes])  # (B, 4)
    named = torch.ones(size, 4, dtype=torch.bool)
    named[:, 1:] = torch.from_numpy(mentions)
    agree = attrs[:, None, :] == attrs[None, :, :]  # [image i, caption j, attribute]
    match = (agree | ~named[None, :, :]).all(-1).float()
    return _to_tensor(images), tokenizer(captions), match


def encode_text_prefix(model: OpenClipModule, tokens: torch.Tensor, length: int,
                       rows: nn.Parameter | None = None,
                       row_of: torch.Tensor | None = None) -> torch.Tensor:
    """``model.encode_text`` on the first ``length`` positions (exact for texts that end
    before ``length``: causal attention, end-of-text pooling). With ``rows`` / ``row_of``, the
    token embedding is ``rows[row_of[token]]`` (the trained rows of the used tokens)."""
    tokens = tokens[:, :length]
    embedded = (model.token_embedding(tokens) if rows is None or row_of is None
                else rows[row_of[tokens]])
    x = embedded + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    return x @ model.text_projection


def contrastive_loss(image_f: torch.Tensor, text_f: torch.Tensor, scale: torch.Tensor,
                     match: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy against the normalised multi-positive targets."""
    logits = scale * F.normalize(image_f, dim=-1) @ F.normalize(text_f, dim=-1).T
    loss_i = -(match / match.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    loss_t = -(match.T / match.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return (loss_i + loss_t) / 2


def _lr_factor(step: int, config: PretrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(config: PretrainConfig, log: Callable[[str], None] = print,
             checkpoint: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    """Train the toy CLIP from scratch; returns it in eval mode.

    ``checkpoint(step, model)`` is called every ``config.checkpoint_every`` steps with the model
    as it stands (embedding rows written back; the model is in train mode, do not modify it).
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    # A fixed thread count and deterministic kernels: the same machine and torch build give the
    # same weights bit for bit (see MODEL_CARD.md for what differs across machines).
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(config, log, checkpoint)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(config: PretrainConfig, log: Callable[[str], None],
           checkpoint: Callable[[int, nn.Module], None] | None) -> nn.Module:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = build_toy_clip(seed=config.seed)
    if config.init:
        model = load_toy_clip("cpu", path=config.init, expected_sha256=None)
    model.train()
    tokenizer = ClipTokenizer()
    # Train only the embedding rows of the tokens captions use (the rest is never stored):
    # a dense (49408, width) gradient and Adam state would cost more than the text tower.
    ids = torch.tensor(token_ids())
    row_of = torch.full((model.token_embedding.num_embeddings,), -1, dtype=torch.long)
    row_of[ids] = torch.arange(len(ids))
    row_of[0] = 0  # padding after the end-of-text token: never read by the pooled feature
    rows = nn.Parameter(model.token_embedding.weight.detach()[ids].clone())
    model.token_embedding.weight.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in trainable if not (p.ndim >= 2 and "embedding" not in n)] + [rows]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.lr,
                                  foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    start, running = time.perf_counter(), 0.0
    for step in range(config.steps):
        images, tokens, match = sample_batch(rng, config.batch_size, tokenizer,
                                             config.mention_colour, config.mention_texture)
        loss = contrastive_loss(model.encode_image(images),
                                encode_text_prefix(model, tokens, TEXT_TRAIN_LENGTH, rows, row_of),
                                model.logit_scale.exp(), match)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running += loss.item()
        if checkpoint is not None and config.checkpoint_every > 0 \
                and (step + 1) % config.checkpoint_every == 0:
            with torch.no_grad():
                model.token_embedding.weight[ids] = rows
            checkpoint(step + 1, model)
        if (step + 1) % LOG_EVERY == 0 or step + 1 == config.steps:
            n = (step % LOG_EVERY) + 1
            log(f"step {step + 1}/{config.steps} loss {running / n:.4f} "
                f"{time.perf_counter() - start:.0f}s")
            running = 0.0
    with torch.no_grad():
        model.token_embedding.weight.zero_()
        model.token_embedding.weight[ids] = rows
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(WEIGHTS_PATH), help="weights file to write")
    defaults = PretrainConfig()
    for name, value in vars(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    config = PretrainConfig(**{k: getattr(args, k) for k in vars(defaults)})
    start = time.perf_counter()

    def checkpoint(step: int, model: nn.Module) -> None:
        path = Path(f"{args.out}.step{step}")
        print(f"wrote {path}; SHA-256 {save_toy_weights(model, path)}")

    model = pretrain(config, checkpoint=checkpoint)
    digest = save_toy_weights(model, args.out)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f}s; SHA-256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
