"""The toy CLIP shipped with dpt_fast: its config, its compact weight format and its loader.

Storage format of ``toy_clip.safetensors`` (all floating tensors fp16):

* every entry of the open_clip ``CLIP`` state_dict **except** ``token_embedding.weight``;
* ``token_embedding.rows``: (K, text_width) — the rows of the token embedding for the K BPE
  ids the toy world's words use (``token_ids``), the only rows pretraining ever trains;
* ``token_embedding.ids``: (K,) int64 — those ids, sorted.

:func:`expand_state` rebuilds the full (49408, text_width) embedding: the stored rows at their
ids, zeros everywhere else. CLIP's full BPE vocabulary (and so the tokenizer dpt_fast uses)
stays valid; words outside the toy world embed to zero, which the toy model never saw anyway.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file

from dpt_fast.seeding import RANDOM_WEIGHTS_SEED, random_weights
from dpt_fast.tokenizer import ClipTokenizer
from dpt_fast.toy_clip import BACKBONE_NAME, PRETRAINED_TAG
from dpt_fast.toy_clip.world import vocabulary

TOY_DIR = Path(__file__).resolve().parent
CONFIG_PATH = TOY_DIR / "toy_clip.json"
WEIGHTS_PATH = TOY_DIR / "toy_clip.safetensors"
MODEL_NAME = CONFIG_PATH.stem  # open_clip registers a config under its file stem
# SHA-256 of the shipped toy_clip.safetensors; load_toy_clip refuses any other file.
WEIGHTS_SHA256 = "a105bd3b0166abebbf446d3e4372f6adf2368b7760bd4be280b3e0926ae1990f"
EMBEDDING_KEY = "token_embedding.weight"
ROWS_KEY = "token_embedding.rows"
IDS_KEY = "token_embedding.ids"
PUNCTUATION = (".", ",")


class ChecksumError(ValueError):
    """The weight file is not the one this version of dpt_fast shipped."""


def token_ids() -> list[int]:
    """Sorted BPE ids of every word and punctuation mark the toy world uses, with SOT/EOT."""
    tokenizer = ClipTokenizer()
    ids = {tokenizer.sot_id, tokenizer.eot_id}
    for word in (*vocabulary(), *PUNCTUATION):
        ids.update(tokenizer.encode(word))
    return sorted(ids)


def build_toy_clip(seed: int = RANDOM_WEIGHTS_SEED) -> open_clip.CLIP:
    """The toy CLIP architecture (``toy_clip.json``) with random weights drawn from ``seed``
    (torch's global generator is left as it was)."""
    config = json.loads(CONFIG_PATH.read_text())
    with random_weights(seed):
        return open_clip.CLIP(**config)


def compact_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict in the storage format above (fp16, used embedding rows only)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    embedding = state.pop(EMBEDDING_KEY)
    ids = torch.tensor(token_ids(), dtype=torch.int64)
    state[ROWS_KEY] = embedding[ids]
    out = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    out[IDS_KEY] = ids
    return out


def expand_state(stored: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """A full fp32 open_clip state_dict from the storage format (zeros for unused tokens)."""
    state = {k: v.float() for k, v in stored.items() if k not in (ROWS_KEY, IDS_KEY)}
    rows, ids = stored[ROWS_KEY].float(), stored[IDS_KEY].long()
    embedding = torch.zeros(vocab_size, rows.shape[1])
    embedding[ids] = rows
    state[EMBEDDING_KEY] = embedding
    return state


def save_toy_weights(model: torch.nn.Module, path: str | Path = WEIGHTS_PATH) -> str:
    """Write the compact weights; returns their SHA-256 (to paste into ``WEIGHTS_SHA256``)."""
    save_file(compact_state(model), str(path), metadata={"format": "dpt_fast-toy-clip-1"})
    return sha256_of(path)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_toy_clip(device: str | torch.device = "cpu", path: str | Path = WEIGHTS_PATH,
                  expected_sha256: str | None = WEIGHTS_SHA256) -> open_clip.CLIP:
    """The pretrained toy CLIP in eval mode, fp32, on ``device``.

    The file's SHA-256 is checked against ``expected_sha256`` (the shipped file's by default;
    None skips the check, for freshly pretrained weights) before safetensors reads it.

    Raises:
        FileNotFoundError: no weight file at ``path``.
        ChecksumError: the file's SHA-256 differs (corrupt, tampered or another version).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"toy CLIP weights not found: {path}")
    if expected_sha256 is not None:
        actual = sha256_of(path)
        if actual != expected_sha256:
            raise ChecksumError(f"{path}: SHA-256 {actual} does not match the expected "
                                f"{expected_sha256}; the file is corrupt or not the shipped one. "
                                "Reinstall dpt_fast or re-run `python -m dpt_fast.toy.pretrain`.")
    model = build_toy_clip()
    vocab_size = model.token_embedding.num_embeddings
    model.load_state_dict(expand_state(load_file(str(path)), vocab_size))
    return model.to(device).eval()


def load_toy_backbone(pretrained: str, device: str | torch.device = "cpu") -> open_clip.CLIP:
    """The CLIP of ``--backbone toy`` (``load_clip`` in the engine), in eval mode.

    ``pretrained``: "toy" for the shipped weights (checksum verified), "" or "none" for random
    weights (smoke tests), or the path of toy weights written by ``python -m
    dpt_fast.toy.pretrain`` (compact format, no checksum: a fresh pretraining has a new one).

    Raises:
        ValueError: any other ``pretrained`` (e.g. the default "openai"), naming the choices.
        FileNotFoundError, ChecksumError: see :func:`load_toy_clip`.
    """
    if pretrained == PRETRAINED_TAG:
        return load_toy_clip(device)
    if pretrained.lower() in ("", "none"):
        return build_toy_clip().to(device).eval()
    if pretrained.endswith(".safetensors"):
        return load_toy_clip(device, path=pretrained, expected_sha256=None)
    raise ValueError(f"--backbone {BACKBONE_NAME} takes --pretrained {PRETRAINED_TAG} (the "
                     f"shipped toy CLIP), none (random weights) or a toy weights .safetensors "
                     f"file from `python -m dpt_fast.toy.pretrain`; got {pretrained!r}")


def write_full_checkpoint(model: torch.nn.Module, path: str | Path) -> Path:
    """Save ``model``'s full fp32 state_dict as safetensors, for open_clip's loader (the engine's
    ``pretrained`` path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return path
