"""Regenerate `pointsets.json`:  python -m fxforge.passes.winograd.build_library [--quick]

For each tile F(m, r) this runs the search per objective (cond; error in fp16; error in bf16; error
in fp16 restricted to dyadic points), keeps each search's best member of its Pareto set, adds the
standard integer points and a few literature sets for comparison, computes the full metrics, and
verifies every entry exactly in 1D and 2D. Deterministic for a given seed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np

from .construct import SCALINGS, standard_points, toom_cook
from .metrics import full_report
from .search import SearchConfig, evaluate_points, search
from .verify import verify

TILES = [(2, 3), (3, 3), (4, 3), (5, 3), (6, 3), (7, 3), (8, 3), (4, 5), (6, 5)]

# Literature sets (anchors-passes.md §5.2-5.4), for comparison only.
REFERENCES = [
    (4, 3, ["0", "7/10", "-7/10", "3/2", "-3/2"], "neon #224 (F(4x4,3x3) ~4x more accurate than {0,+-1,+-2})"),
    (6, 3, ["0", "1", "-1", "2", "-2", "1/2", "-1/2"], "wincnn README / NNPACK #8"),
    (6, 3, ["0", "5/6", "-5/6", "7/6", "-7/6", "3/5", "-3/5"], "NOVA abstract example {+-5/6, +-7/6, +-3/5} (0 added)"),
    (6, 3, ["0", "1", "-1", "5/6", "-5/6", "7/6", "-7/6"], "wincnn issue #1"),
    (8, 3, ["0", "1", "-1", "2", "-2", "1/2", "-1/2", "3/2", "-3/2"], "wincnn issue #8"),
    (4, 5, ["0", "1", "-1", "2", "-2", "1/2", "-1/2"], "wincnn issue #22 (reuse F(6,3) points)"),
]

SEARCHES = [  # (objective, dtype, dyadic)
    ("cond", None, False),
    ("error", "fp16", False),
    ("error", "bf16", False),
    ("error", "fp16", True),
]


def _entry(t, kind, objective=None, dtype=None, seed=None, search_cfg=None, source=None, pick_scaling="fp16"):
    v = verify(t)
    rep = full_report(t)
    return {
        "id": f"F({t.m},{t.r})/{kind}" + (f"/{objective}" if objective else "") + (f"/{dtype}" if dtype else "")
              + ("/dyadic" if search_cfg and search_cfg.get("dyadic") else ""),
        "m": t.m, "r": t.r, "kind": kind, "objective": objective, "dtype": dtype,
        "points": t.points_str() + ["inf"], "scaling": t.scaling, "seed": seed, "search": search_cfg,
        "source": source, "scaling_chosen_for": pick_scaling,
        "verification": {"1d": v[1].ok, "2d": v[2].ok, "method": v[1].method},
        "metrics": rep,
    }


def _best_scaling(m, r, pts, dtype="fp16"):
    """Pick the scaling placement with the lowest `dtype` stage error (fairness for fixed sets)."""
    cfg = SearchConfig(m=m, r=r, dtype=dtype)
    c = evaluate_points(pts, cfg, scalings=SCALINGS)
    return toom_cook(m, r, pts, c.scaling)


def build(quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    gens, restarts = (20, 1) if quick else (100, 3)
    entries, fronts = [], {}
    t0 = time.perf_counter()
    for m, r in TILES:
        entries.append(_entry(_best_scaling(m, r, standard_points(m, r)), "standard", source="integer points 0, +-1, +-2, ..."))
        for mm, rr, pts, src in REFERENCES:
            if (mm, rr) == (m, r):
                entries.append(_entry(_best_scaling(m, r, pts), "reference", source=src))
        for objective, dtype, dyadic in SEARCHES:
            cfg = SearchConfig(m=m, r=r, dtype=dtype or "fp16", objectives=(objective,), generations=gens,
                               restarts=restarts, seed=seed, dyadic=dyadic)
            res = search(cfg, progress=progress)
            if not res.pareto:
                continue
            c = res.best("kappa" if objective == "cond" else "ratio")
            scfg = {"objectives": [objective], "dtype": cfg.dtype if objective != "cond" else None,
                    "generations": gens, "restarts": restarts, "popsize": cfg.popsize, "symmetric": cfg.symmetric,
                    "max_den": cfg.max_den, "dyadic": dyadic, "model": cfg.model, "search_data": cfg.search_data,
                    "eval_data": cfg.eval_data, "seconds": round(res.stats["seconds"], 2)}
            entries.append(_entry(c.transform(m, r), "found", objective, dtype, seed, scfg,
                                  source="fxforge CMA-ES search + snapping + exact verification",
                                  pick_scaling=dtype or "fp16"))
            key = f"F({m},{r})/{objective}" + (f"/{dtype}" if dtype else "") + ("/dyadic" if dyadic else "")
            fronts[key] = [{"points": [str(p) for p in x.points] + ["inf"], "scaling": x.scaling, "kappa": x.kappa,
                            "ratio": x.ratio, "max_den": x.max_den, "verified_1d": x.verified_1d,
                            "verified_2d": x.verified_2d} for x in res.pareto]
            print(f"{key:<28} {[str(p) for p in c.points]} kappa={c.kappa:.4g} ratio={c.ratio:.4g} "
                  f"({res.stats['seconds']:.1f}s)", flush=True)
    import numpy
    import sympy

    return {
        "schema": 1,
        "generated": datetime.date.today().isoformat(),
        "generator": "python -m fxforge.passes.winograd.build_library" + (" --quick" if quick else ""),
        "versions": {"numpy": numpy.__version__, "sympy": sympy.__version__},
        "seconds": round(time.perf_counter() - t0, 1),
        "definitions": {
            "kappa_vandermonde_finite": "2-norm condition number of the (alpha-1)x(alpha-1) Vandermonde matrix on the finite points (NOVA's figure: 1.97e5 for standard F(8,3)); _2d = square (Kronecker)",
            "error": "relative L2 error of 2D F(mxm, rxr) on 128 tiles x 16 channels x 8 filters of N(0,1) data (seed 0) vs float64 direct correlation of the unrounded data; ratio = winograd / direct, both under the same precision model (see emulate.py: stage = every stage output and every constant rounded to the dtype, fp32 accumulation inside stages)",
            "verification": "exact polynomial identity over Q[d, g] in 1D and 2D (sympy sparse polynomial ring over QQ)",
        },
        "entries": entries,
        "pareto": fronts,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budget (for smoke tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", default=str(Path(__file__).with_name("pointsets.json")))
    a = ap.parse_args(argv)
    doc = build(a.quick, a.seed, progress=False)
    bad = [e["id"] for e in doc["entries"] if not (e["verification"]["1d"] and e["verification"]["2d"])]
    if bad:
        raise SystemExit(f"unverified entries: {bad}")
    Path(a.output).write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    print(f"wrote {a.output}: {len(doc['entries'])} entries in {doc['seconds']} s")
    return 0


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(type(o))


if __name__ == "__main__":
    raise SystemExit(main())
