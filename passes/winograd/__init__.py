"""Winograd / Toom-Cook transforms with numerically searched points (issue 5, CPU side).

construct   exact F(m, r) from rational points + infinity, scaling placement (G / A / B / balanced)
verify      exact polynomial-identity verification over Q[d, g], 1D and 2D
emulate     fp16 / bf16 emulation of 2D Winograd and direct correlation (precision models)
metrics     condition numbers (NOVA's definition and the others), constants, range, error
es / snap   CMA-ES and rational / dyadic snapping with lattice refinement
search      the NOVA pipeline: ES -> snap -> verify -> Pareto set
library     the shipped, verified point-set library (pointsets.json)
conv        torch emulation of Winograd conv2d (NCHW, padding, tiling) for model-level fidelity
"""
from .construct import SCALINGS, Transform, from_matrices, standard_points, toom_cook
from .verify import UnverifiedTransformError, require_verified, verify, verify_1d, verify_2d

__all__ = ["SCALINGS", "Transform", "from_matrices", "standard_points", "toom_cook", "UnverifiedTransformError",
           "require_verified", "verify", "verify_1d", "verify_2d"]
