"""Conditioning, fp16 error bounds and the torch emulation (issue 5).

The issue's fp16 targets (found F(4,3) <= 2x, F(6,3) <= 4x, F(8,3) <= 10x of direct fp16) are *not*
reachable with points + infinity under these precision models: the analytic optimum over all real
point sets is ~4.8x / ~20x / ~112x in the stage model (benchmarks/results/winograd_numerics.md). The
bounds below are what the shipped sets achieve, with ~15% margin, so that a regression is caught.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fxforge.passes.winograd import library, standard_points, toom_cook
from fxforge.passes.winograd.conv import direct_conv2d, winograd_conv2d
from fxforge.passes.winograd.emulate import round_to, relative_error
from fxforge.passes.winograd.metrics import (constants_report, cond_report, error_amplification, kappa_nova,
                                             range_report)


def test_kappa_definition_matches_nova_figure():
    # NOVA: "kappa = 2 x 10^5 for F(8,3)" with standard integer points
    k = kappa_nova(standard_points(8, 3))
    assert 1.9e5 < k < 2.1e5


def test_f83_conditioning_improvement_1d_and_2d():
    std = cond_report(library.standard(8, 3).transform())
    found = cond_report(library.found(8, 3, "cond", None).transform())
    gain_1d = std["kappa_vandermonde_finite_1d"] / found["kappa_vandermonde_finite_1d"]
    gain_2d = std["kappa_vandermonde_finite_2d"] / found["kappa_vandermonde_finite_2d"]
    assert gain_1d >= 415
    assert gain_2d >= 415 ** 2


@pytest.mark.parametrize("m", [4, 6])
def test_conditioning_improves_for_smaller_tiles(m):
    assert kappa_nova(library.found(m, 3, "cond", None).transform().points) < kappa_nova(standard_points(m, 3)) / 2


def test_kronecker_identity_for_2d_kappa():
    t = toom_cook(4, 3, ["0", "2/3", "-2/3", "8/5", "-8/5"])
    for M, key in zip(t.numpy(), ("kappa_AT", "kappa_G", "kappa_BT")):
        s = np.linalg.svd(np.kron(M, M), compute_uv=False)
        assert math.isclose(s[0] / s[-1], cond_report(t)[key + "_2d"], rel_tol=1e-8)


# (m, bound on found/direct in the fp16 stage model)
FOUND_BOUNDS = [(4, 5.6), (6, 23.0), (8, 130.0)]


@pytest.mark.parametrize("m,bound", FOUND_BOUNDS)
def test_fp16_error_of_found_sets(m, bound):
    e = relative_error(library.found(m, 3, "error", "fp16").transform(), m, 3, "fp16", "stage", tiles=96, seed=3)
    assert e.finite and e.ratio <= bound
    std = relative_error(library.standard(m, 3).transform(), m, 3, "fp16", "stage", tiles=96, seed=3)
    assert e.winograd < std.winograd


@pytest.mark.parametrize("m", [6, 8])
def test_integer_sets_fail_in_fp16(m):
    e = relative_error(library.standard(m, 3).transform(), m, 3, "fp16", "stage", tiles=96, seed=3)
    assert (not e.finite) or e.winograd > 0.1          # F(6,3): ~0.33 relative error; F(8,3): overflow


def test_analytic_amplification_predicts_error():
    for m in (4, 6):
        t = library.found(m, 3, "error", "fp16").transform()
        pred = error_amplification(t, 3)["pred_ratio_stage"]
        meas = relative_error(t, m, 3, "fp16", "stage", tiles=96, seed=3).ratio
        assert 0.75 < meas / pred < 1.25


def test_rounding_helpers():
    x = torch.randn(10000, dtype=torch.float32) * 100
    assert np.array_equal(round_to(x.double().numpy(), "bf16"), x.to(torch.bfloat16).double().numpy())
    assert np.array_equal(round_to(x.double().numpy(), "fp16"), x.to(torch.float16).double().numpy())
    assert round_to(np.array([70000.0]), "fp16")[0] == np.inf


def test_constants_and_range_reports():
    dy = toom_cook(4, 3, ["0", "1/2", "-1/2", "3/2", "-3/2"], "G")
    rep = constants_report(dy, "fp16")
    assert rep["AT"]["exact"] and rep["BT"]["exact"] and rep["AT"]["dyadic"]
    nd = constants_report(toom_cook(6, 3, ["0", "5/6", "-5/6", "7/6", "-7/6", "3/5", "-3/5"]), "fp16")
    assert not nd["AT"]["exact"] and nd["AT"]["max_rel_rounding"] > 0
    assert range_report(library.standard(8, 3).transform(), "fp16")["overflow_possible"]


@pytest.mark.parametrize("m", [2, 4, 6, 8])
@pytest.mark.parametrize("shape,pad", [((7, 9), 1), ((13, 8), 2), ((5, 5), 0)])
def test_torch_winograd_conv_is_exact_in_float64(m, shape, pad):
    torch.manual_seed(m)
    x = torch.randn(2, 3, *shape, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    t = library.found(m, 3, "error", "fp16").transform()
    ref = F.conv2d(x, w, b, padding=pad)
    y = winograd_conv2d(x, w, t, b, pad)
    assert y.shape == ref.shape
    assert (y - ref).abs().max() <= 1e-9 * ref.abs().max()


def test_torch_emulation_agrees_with_numpy_emulation():
    torch.manual_seed(0)
    t = library.found(4, 3, "error", "fp16").transform()
    x, w = torch.randn(2, 16, 24, 24), torch.randn(8, 16, 3, 3)
    ref = F.conv2d(x.double(), w.double(), padding=1)
    err = lambda y: ((y.double() - ref).norm() / ref.norm()).item()
    e_dir = err(direct_conv2d(x, w, padding=1, dtype="fp16"))
    e_win = err(winograd_conv2d(x, w, t, padding=1, dtype="fp16"))
    tiles = relative_error(t, 4, 3, "fp16", "stage")
    assert 0.6 < (e_win / e_dir) / tiles.ratio < 1.5
