"""Triton kernels (one module per op), shipped as ddfast.kernels."""
