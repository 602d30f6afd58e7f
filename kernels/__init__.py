"""Triton kernels of moco_fast (placeholder)."""
AVAILABLE = False
