"""The NOVA search: reproducibility, verification of its output, snapping, CMA-ES, CLI (issue 5)."""
import json
from fractions import Fraction

import numpy as np

from fxforge.passes.winograd import verify_2d
from fxforge.passes.winograd.es import CMAES
from fxforge.passes.winograd.search import SearchConfig, search
from fxforge.passes.winograd.snap import expand, lattice_neighbours, refine, snap_value

TINY = dict(generations=6, restarts=1, popsize=8, max_den=8,
            search_data={"tiles": 16, "channels": 4, "filters": 2, "seed": 1234},
            eval_data={"tiles": 32, "channels": 4, "filters": 4, "seed": 0})


def test_search_is_reproducible_with_a_seed():
    a = search(SearchConfig(m=4, seed=11, **TINY), progress=False)
    b = search(SearchConfig(m=4, seed=11, **TINY), progress=False)
    assert a.to_dict()["pareto"] == b.to_dict()["pareto"]
    assert a.stats["runs"] == b.stats["runs"]
    assert a.pareto


def test_search_output_is_verified_and_beats_standard():
    res = search(SearchConfig(m=4, seed=0, **TINY), progress=False)
    for c in res.pareto:
        assert c.verified_1d and c.verified_2d
        assert verify_2d(c.transform(4, 3)).ok
    assert min(c.kappa for c in res.pareto) < 42.4          # standard F(4,3): 42.5
    assert res.stats["verified"] + res.stats["rejected"] == res.stats["snapped"]


def test_dyadic_mode_gives_power_of_two_denominators():
    res = search(SearchConfig(m=4, seed=0, dyadic=True, dyadic_bits=4, **TINY), progress=False)
    for c in res.pareto:
        assert c.dyadic and all(p.denominator & (p.denominator - 1) == 0 for p in c.points)


def test_snapping_and_lattice():
    assert snap_value(0.8333, max_den=6) == Fraction(5, 6)
    assert snap_value(0.65, bits=3) == Fraction(5, 8)
    nb = lattice_neighbours(Fraction(1, 2), max_den=4)
    assert Fraction(1, 2) not in nb and all(f.denominator <= 4 for f in nb)
    assert expand([Fraction(1), Fraction(2)], 5, True) == [0, 1, -1, 2, -2]
    # refine walks to the lattice minimum of a simple objective
    target = [Fraction(3, 4)]
    params, val, _ = refine([Fraction(1, 4)], lambda pts: abs(float(pts[1]) - 0.75), 3, True, max_den=4, sweeps=6)
    assert params == target and val == 0


def test_cmaes_minimises_a_quadratic():
    rng = np.random.default_rng(0)
    es = CMAES(np.ones(4) * 3, 1.0, rng)
    for _ in range(150):
        X = es.ask()
        es.tell(X, ((X - 0.5) ** 2).sum(1))
    assert np.allclose(es.best_x, 0.5, atol=1e-3)


def test_cli_writes_entry(tmp_path):
    from fxforge.winograd_cli import main

    out = tmp_path / "w.json"
    rc = main(["search-winograd", "--m", "3", "--generations", "4", "--restarts", "1", "--no-plot",
               "--no-progress", "-o", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["entry"]["verification"] == {"1d": True, "2d": True, "method": "sympy-ring-QQ"}
    assert doc["entry"]["points"][-1] == "inf" and doc["pareto"]
