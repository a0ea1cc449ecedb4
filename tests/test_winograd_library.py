"""Every shipped point set verifies exactly, in 1D and 2D, and carries its provenance (issue 5)."""
import pytest

from fxforge.passes.winograd import library, toom_cook, verify_1d, verify_2d

ENTRIES = library.load()
# Identical (points, scaling) pairs appear under several objectives; verify each transform once.
UNIQUE = sorted({(e.m, e.r, tuple(e.points), e.scaling) for e in ENTRIES})


def test_library_covers_required_tiles():
    have = {(e.m, e.r) for e in ENTRIES}
    assert {(m, 3) for m in range(2, 9)} | {(4, 5), (6, 5)} <= have
    for m, r in have:
        kinds = {e.kind for e in library.entries(m, r)}
        assert {"standard", "found"} <= kinds


def test_provenance_recorded():
    for e in ENTRIES:
        assert e.raw["verification"]["1d"] and e.raw["verification"]["2d"]
        assert e.raw["source"]
        if e.kind == "found":
            assert e.raw["seed"] is not None and e.raw["search"]["objectives"] == [e.objective]
        assert "kappa_vandermonde_finite_1d" in e.raw["metrics"]["cond"]
        assert {"fp16", "bf16"} <= set(e.raw["metrics"]["error"])


@pytest.mark.parametrize("m,r,points,scaling", UNIQUE, ids=[f"F({u[0]},{u[1]})-{'_'.join(u[2])}-{u[3]}" for u in UNIQUE])
def test_shipped_set_verifies_1d_and_2d(m, r, points, scaling):
    t = toom_cook(m, r, [p for p in points if p != "inf"], scaling)
    assert verify_1d(t).ok
    assert verify_2d(t).ok


def test_best_and_transform():
    e = library.best(6, 3, "fp16")
    assert e.verified and e.ratio("fp16") < library.standard(6, 3).ratio("fp16")
    t = e.transform()
    assert (t.m, t.r) == (6, 3)
    assert library.best(8, 3, by="cond").kappa <= library.found(8, 3, "cond", None).kappa
