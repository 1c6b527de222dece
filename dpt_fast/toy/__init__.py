"""Toy few-shot tasks in the toy world, ``dpt-fast demo`` on them and the toy CLIP's
pretraining: a real first run of dpt_fast with no downloads. The toy CLIP itself (world,
weights, loader) is :mod:`dpt_fast.toy_clip`, below the model layer. See MODEL_CARD.md."""
