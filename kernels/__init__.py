"""Triton kernels of dpt_fast, installed as ``dpt_fast.kernels`` (never a top-level package).

``prompt_attention`` holds the launchers of the fused prompt attention (the op around them:
``dpt_fast.ops.prompt_attention``; the design: ``docs/DESIGN.md``). Importing this package does
not import triton; importing ``dpt_fast.kernels.prompt_attention`` does.
"""
