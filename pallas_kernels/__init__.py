"""Attention, GEMM and fused small-op kernels, each file with its jnp reference beside it."""
