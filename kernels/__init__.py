"""Triton kernels of dpt_fast, installed as ``dpt_fast.kernels`` (never a top-level package).

The fused prompt attention (shared/DESIGN.md §3) lives here.
"""
