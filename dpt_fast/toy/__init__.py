"""A toy world, a toy CLIP pretrained on it (shipped, 3 MB) and a toy few-shot task: a real
first run of dpt_fast with no downloads (``dpt-fast demo``). See MODEL_CARD.md."""
