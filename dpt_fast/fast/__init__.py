"""Building blocks of the fast DPT (docs/DESIGN.md §2): decomposed residual blocks, the
prompt-K/V vision encoder and the shared-prefix text encoder."""
