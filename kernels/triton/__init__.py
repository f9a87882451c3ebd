"""Triton kernel sources (``@triton.jit`` functions only; launchers live in int8mm/backends/triton.py)."""
