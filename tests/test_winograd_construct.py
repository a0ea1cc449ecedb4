"""Exact Toom-Cook construction and exact verification (issue 5)."""
from fractions import Fraction

import numpy as np
import pytest
import sympy

from fxforge.passes.winograd import (SCALINGS, UnverifiedTransformError, from_matrices, require_verified,
                                     standard_points, toom_cook, verify, verify_1d, verify_2d)
from fxforge.passes.winograd.construct import numeric_transform


def test_f23_matches_lavin_gray():
    t = toom_cook(2, 3, [0, 1, -1])
    R = sympy.Rational
    assert t.AT == sympy.Matrix([[1, 1, 1, 0], [0, 1, -1, 1]])
    assert t.G == sympy.Matrix([[1, 0, 0], [R(1, 2), R(1, 2), R(1, 2)], [R(1, 2), R(-1, 2), R(1, 2)], [0, 0, 1]])
    # Lavin & Gray's B^T up to the sign of the infinity row (a free diagonal +-1)
    assert t.BT[:3, :] == sympy.Matrix([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0]])
    assert t.BT[3, :] == sympy.Matrix([[0, -1, 0, 1]])


@pytest.mark.parametrize("scaling", SCALINGS)
def test_every_scaling_is_exact(scaling):
    t = toom_cook(4, 3, ["0", "2/3", "-2/3", "8/5", "-8/5"], scaling)
    assert all(v.ok for v in verify(t).values())


def test_scalings_move_fractions():
    pts = standard_points(4, 3)
    g, a = toom_cook(4, 3, pts, "G"), toom_cook(4, 3, pts, "A")
    assert all(x.denominator == 1 for row in g.BT_q for x in row)       # fractions in G: B^T integral
    assert all(x.denominator == 1 for row in a.G_q for x in row)        # fractions in A: G integral
    assert any(x.denominator != 1 for row in a.AT_q for x in row)


@pytest.mark.parametrize("m,r", [(2, 3), (3, 3), (4, 3), (6, 3), (3, 2), (2, 5), (1, 3)])
def test_standard_points_verify(m, r):
    t = toom_cook(m, r, standard_points(m, r))
    assert verify_1d(t).ok and verify_2d(t).ok


def test_bad_point_lists_raise():
    with pytest.raises(ValueError):
        toom_cook(4, 3, [0, 1, -1, 2])                  # too few
    with pytest.raises(ValueError):
        toom_cook(4, 3, [0, 1, -1, 2, 2])               # duplicate
    with pytest.raises(TypeError):
        toom_cook(2, 3, [0, 0.5, -1])                   # inexact float
    with pytest.raises(ValueError):
        toom_cook(2, 3, [0, 1, -1], scaling="C")


def _perturbed(t, which, i, j, delta=Fraction(1, 7)):
    mats = {"AT": [list(r) for r in t.AT_q], "G": [list(r) for r in t.G_q], "BT": [list(r) for r in t.BT_q]}
    mats[which][i][j] += delta
    return from_matrices(t.m, t.r, mats["AT"], mats["G"], mats["BT"], t.points)


@pytest.mark.parametrize("which,i,j", [("AT", 1, 2), ("G", 3, 0), ("BT", 2, 4), ("BT", 5, 5)])
def test_wrong_transform_rejected(which, i, j):
    t = toom_cook(4, 3, standard_points(4, 3))
    bad = _perturbed(t, which, i, j)
    assert not verify_1d(bad).ok and not verify_2d(bad).ok
    with pytest.raises(UnverifiedTransformError):
        require_verified(bad)


def test_mismatched_points_rejected():
    """G from one point set with A/B from another: each matrix is plausible, the triple is wrong."""
    a = toom_cook(4, 3, standard_points(4, 3))
    b = toom_cook(4, 3, ["0", "1", "-1", "1/2", "-1/2"])
    bad = from_matrices(4, 3, a.AT_q, b.G_q, a.BT_q)
    assert not verify_1d(bad).ok and not verify_2d(bad).ok


def test_wrong_shape_rejected():
    t = toom_cook(2, 3, [0, 1, -1])
    bad = from_matrices(2, 3, t.AT_q, t.G_q[:3], t.BT_q)
    assert not verify_1d(bad).ok and "G must be" in verify_1d(bad).detail


def test_numeric_transform_matches_exact():
    pts = ["0", "3/7", "-3/7", "4/5", "-4/5", "11/9", "-11/9"]
    exact = toom_cook(6, 3, pts, "G").numpy()
    approx = numeric_transform([float(Fraction(p)) for p in pts], 6, 3)
    for x, y in zip(exact, approx):
        np.testing.assert_allclose(y, x, rtol=1e-12, atol=1e-12)
