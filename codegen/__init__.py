"""Codegen: ATen FX graph -> fused Triton kernels + eager steps (``lower_graph``)."""
