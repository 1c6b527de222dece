"""What the toy CLIP knows: zero-shot and linear-probe accuracy, per attribute and on the task.

    python benchmarks/toy_probe.py [--weights PATH] [--out results.json]

* Attributes (shape, colour, texture, position) on fresh world scenes: zero-shot with "a photo
  of a {} shape." style prompts, and a linear probe (multinomial logistic regression on the
  normalised image features) trained on ``--probe-train`` scenes, tested on ``--probe-test``.
* The toy task (faded, as shipped) and the same scenes unfaded: zero-shot with the task's
  template, and a 16-shot linear probe (the few-shot draw of ``--seed``) started from the
  zero-shot classifier, on centre crops; both on the task's test split.

The numbers of MODEL_CARD.md come from this script with its defaults. One thread, so the
result does not depend on the machine's thread count.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from json_report import emit

from dpt_fast.data import ImageDataset, build_dataset, build_transforms
from dpt_fast.tokenizer import ClipTokenizer
from dpt_fast.toy import task
from dpt_fast.toy.pretrain import _to_tensor
from dpt_fast.toy_clip import PRETRAINED_TAG
from dpt_fast.toy_clip.model import load_toy_backbone
from dpt_fast.toy_clip.world import COLOURS, POSITIONS, SHAPES, TEXTURES, render, sample_scene

ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "texture": TEXTURES,
              "position": tuple(POSITIONS)}


def attribute_prompt(attribute: str, value: str) -> str:
    """A hand-crafted prompt naming one attribute of a scene."""
    if attribute == "shape":
        return f"a photo of a {value}."
    if attribute == "position":
        return "a photo of a shape " + ("in the centre." if value == "centre"
                                        else f"at the {value}.")
    return f"a photo of a {value} shape."


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, init: torch.Tensor, scale: float = 20.0) -> float:
    """Accuracy (%) of a logistic regression on normalised features (N, E), weights (E, C)
    started at ``init`` (the zero-shot text features) and kept near it (L2 pull 1e-3)."""
    weight = init.clone().contiguous().requires_grad_(True)
    bias = torch.zeros(init.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(scale * train_x @ weight + bias, train_y) \
            + 1e-3 * (weight - init).pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predictions = (scale * test_x @ weight + bias).argmax(-1)
    return 100.0 * (predictions == test_y).float().mean().item()


@torch.no_grad()
def _image_features(clip, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.normalize(clip.encode_image(images[i:i + 200]), dim=-1)
                      for i in range(0, len(images), 200)])


@torch.no_grad()
def _text_features(clip, prompts: list[str]) -> torch.Tensor:
    return F.normalize(clip.encode_text(ClipTokenizer()(prompts)), dim=-1)


def attributes_report(clip, n_train: int, n_test: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n_train + n_test)]
    features = _image_features(clip, _to_tensor([render(s, rng) for s in scenes]))
    report = {}
    for attribute, values in ATTRIBUTES.items():
        labels = torch.tensor([values.index(getattr(s, attribute)) for s in scenes])
        text = _text_features(clip, [attribute_prompt(attribute, v) for v in values])
        zero_shot = (features[n_train:] @ text.T).argmax(-1).eq(labels[n_train:])
        report[attribute] = {
            "classes": len(values), "zero_shot": 100.0 * zero_shot.float().mean().item(),
            "linear_probe": linear_probe(features[:n_train], labels[:n_train],
                                         features[n_train:], labels[n_train:], text.T)}
    return report


def task_report(clip, root: Path, seed: int) -> dict:
    splits = build_dataset(task.DATASET_NAME, root, shots=16, seed=seed)
    transform = build_transforms(train=False, image_size=clip.visual.image_size[0])

    def encode(items):
        data = ImageDataset(items, transform)
        images = torch.stack([data[i][0] for i in range(len(data))])
        return _image_features(clip, images), torch.tensor([d.label for d in items])

    train_x, train_y = encode(splits.train)
    test_x, test_y = encode(splits.test)
    text = _text_features(clip, [task.TEMPLATE.format(c) for c in splits.classnames])
    zero_shot = (test_x @ text.T).argmax(-1).eq(test_y).float().mean().item()
    return {"test_images": len(splits.test), "zero_shot": 100.0 * zero_shot,
            "linear_probe_16_shots": linear_probe(train_x, train_y, test_x, test_y, text.T)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=PRETRAINED_TAG,
                        help="toy weights: 'toy' (shipped) or a file from the pretraining")
    parser.add_argument("--probe-train", type=int, default=2000)
    parser.add_argument("--probe-test", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1, help="few-shot draw of the task probe")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    clip = load_toy_backbone(args.weights)
    report = {"weights": args.weights,
              "attributes": attributes_report(clip, args.probe_train, args.probe_test, seed=99)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, amount in (("task", task.FADE), ("task_unfaded", 0.0)):
            task.write_task(Path(tmp) / name, fade_amount=amount)
            report[name] = task_report(clip, Path(tmp) / name, args.seed)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
