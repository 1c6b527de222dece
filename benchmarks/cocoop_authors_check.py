"""The outside check of issue 26: the authors' CoCoOp against dpt_fast's, through a checkpoint.

Builds the authors' ``CustomCLIP`` (``KaiyangZhou/CoOp`` ``trainers/cocoop.py`` with their
``clip`` package) on a small random OpenAI-architecture CLIP, saves its ``prompt_learner`` with
Dassl's own ``save_checkpoint`` (``model.pth.tar-10`` and ``model-best.pth.tar``), loads that
folder into ``dpt_fast.CoCoOp`` and ``dpt_fast.reference.CoCoOp`` (``load_official_checkpoint``)
on the same CLIP converted to open_clip, and compares the logits (eval mode) and the loss
(training mode) for the authors' context initialisation and a random one. Exit status 1 on a
mismatch beyond fp32 rounding (relative 1e-5).

Needs checkouts of the two repositories (nothing of them is copied here):

    # /tmp/CoOp: a checkout of KaiyangZhou/CoOp; /tmp/Dassl.pytorch: of KaiyangZhou/Dassl.pytorch
    python benchmarks/cocoop_authors_check.py --coop /tmp/CoOp --dassl /tmp/Dassl.pytorch

Only ``dassl.utils`` is imported from Dassl (``save_checkpoint``); the rest of the package, which
``trainers/cocoop.py`` imports names from but does not use to build the module (trainer registry,
optimizer builders, metrics), is replaced by stand-ins in a temporary folder, so Dassl's data
and engine dependencies need not be installed. The CLIP is fp32 (the authors' PREC fp32/amp).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import types
from pathlib import Path

RTOL = 1e-5  # fp32 rounding (docs/DESIGN.md §5)
CLASSNAMES = ["cat", "dog", "sea_lion", "red panda", "golden retriever", "tree", "airliner"]
NOISE = 0.02  # std of the noise added to every CLIP weight (OpenAI's init leaves some constant)
STANDINS = {
    "dassl/__init__.py": "",
    "dassl/engine/__init__.py": (
        "class _Registry:\n    def register(self):\n        return lambda cls: cls\n"
        "TRAINER_REGISTRY = _Registry()\nclass TrainerX:\n    pass\n"),
    "dassl/metrics/__init__.py": (
        "def compute_accuracy(*args, **kwargs):\n    raise NotImplementedError\n"),
    "dassl/optim/__init__.py": (
        "def build_optimizer(*args, **kwargs):\n    raise NotImplementedError\n"
        "def build_lr_scheduler(*args, **kwargs):\n    raise NotImplementedError\n"),
}


def _authors_modules(coop: Path, dassl: Path, folder: Path) -> tuple:
    """(their clip.model module, Dassl's save_checkpoint, their CustomCLIP)."""
    for name, text in STANDINS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    shutil.copytree(dassl / "dassl" / "utils", folder / "dassl" / "utils")
    sys.path[:0] = [str(folder), str(coop)]
    from clip import model as clip_model
    from dassl.utils import save_checkpoint

    spec = importlib.util.spec_from_file_location("authors_cocoop", coop / "trainers" / "cocoop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return clip_model, save_checkpoint, module.CustomCLIP


def _ns(**kw) -> types.SimpleNamespace:
    return types.SimpleNamespace(**kw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coop", type=Path, required=True, help="a KaiyangZhou/CoOp checkout")
    parser.add_argument("--dassl", type=Path, required=True,
                        help="a KaiyangZhou/Dassl.pytorch checkout")
    args = parser.parse_args(argv)
    import open_clip
    import torch

    from dpt_fast import CoCoOp, CoCoOpConfig
    from dpt_fast.reference import CoCoOp as ReferenceCoCoOp

    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        clip_model, save_checkpoint, custom_clip = _authors_modules(args.coop, args.dassl,
                                                                    Path(tmp))
        torch.manual_seed(0)
        # Widths of 64: open_clip's converter infers 64-wide heads. Embed 64: meta-net width 4.
        theirs_clip = clip_model.CLIP(
            embed_dim=64, image_resolution=32, vision_layers=3, vision_width=64,
            vision_patch_size=8, context_length=77, vocab_size=49408, transformer_width=64,
            transformer_heads=1, transformer_layers=2).float().eval()
        with torch.no_grad():
            for p in theirs_clip.parameters():
                p.add_(NOISE * torch.randn_like(p))
        state = {k: v.clone() for k, v in theirs_clip.state_dict().items()}
        ours_clip = open_clip.model.build_model_from_openai_state_dict(dict(state)).float()
        ours_clip.load_state_dict(state)  # the converter rounds through fp16 on the way
        ours_clip.eval()
        images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        labels = torch.tensor([0, 2, 5, 3])
        for ctx_init in ("a photo of a", ""):
            cfg = _ns(TRAINER=_ns(COCOOP=_ns(N_CTX=4, CTX_INIT=ctx_init, PREC="fp32")),
                      INPUT=_ns(SIZE=(32, 32)))
            torch.manual_seed(1)
            authors = custom_clip(cfg, CLASSNAMES, theirs_clip)
            learner = authors.prompt_learner
            with torch.no_grad():  # a trained-looking context, not the initial words
                learner.ctx.add_(0.05 * torch.randn_like(learner.ctx))
            optim = torch.optim.SGD(learner.parameters(), lr=0.002, momentum=0.9)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, 10)
            folder = Path(tmp) / f"run_{len(ctx_init)}"
            save_checkpoint({"state_dict": learner.state_dict(), "epoch": 10,
                             "optimizer": optim.state_dict(), "scheduler": sched.state_dict(),
                             "val_result": None}, str(folder / "prompt_learner"), is_best=True)
            authors.eval()
            with torch.no_grad():
                logits_a = authors(images)
            authors.train()
            loss_a = authors(images, labels).item()
            for name, cls in (("fast", CoCoOp), ("reference", ReferenceCoCoOp)):
                for epoch in (None, 10):
                    ours = cls(ours_clip, CLASSNAMES, CoCoOpConfig(ctx_init=ctx_init, n_ctx=4))
                    ours.load_official_checkpoint(folder, epoch)
                    with torch.no_grad():
                        logits = ours.eval()(images).logits
                    ours.train()
                    loss = ours.loss(ours(images), labels).item()
                    rel = ((logits - logits_a).norm() / logits_a.norm()).item()
                    loss_rel = abs(loss - loss_a) / abs(loss_a)
                    ok = rel <= RTOL and loss_rel <= RTOL
                    failures += not ok
                    print(f"ctx_init={ctx_init!r:15} {name:9} epoch={epoch!s:4} logits rel err "
                          f"{rel:.1e}, loss {loss:.6f} vs the authors' {loss_a:.6f} "
                          f"(rel {loss_rel:.1e}) {'ok' if ok else 'MISMATCH'}")
    print("authors' check " + ("passed" if not failures else f"FAILED ({failures})"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
