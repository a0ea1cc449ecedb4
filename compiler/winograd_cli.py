"""``fxforge search-winograd``: NOVA-style search for Winograd points, from the command line.

    fxforge search-winograd --m 6 --r 3 --dtype fp16 [--objective pareto|cond|error|proxy|mix]
                            [--seed 0] [--generations 60] [--restarts 2] [--dyadic] [-o out.json]

Prints the comparison table (standard integer points, the shipped library's best, and this run's
Pareto set), writes a JSON entry (this run's best set in the library's schema, plus the Pareto set
and the run's provenance) and a plot of 2D error vs tile size (ours vs standard vs direct).

Wired into ``fxforge.cli`` by ``add_parser(subparsers)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import datetime
import json
import math
import sys
import time
from pathlib import Path

OBJECTIVE_SETS = {"pareto": ("cond", "error", "mix"), "cond": ("cond",), "error": ("error",),
                  "proxy": ("proxy",), "mix": ("mix",)}


def add_parser(subparsers):
    p = subparsers.add_parser("search-winograd", help="search numerically stable Winograd points (NOVA)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=6, help="output tile size m of F(m, r)")
    p.add_argument("--r", type=int, default=3, help="filter size r of F(m, r)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--objective", default="pareto", choices=sorted(OBJECTIVE_SETS),
                   help="pareto = one run each of cond, error and mix")
    p.add_argument("--weights", type=float, nargs=2, default=(0.5, 0.5), metavar=("W_COND", "W_ERR"),
                   help="weights of log10 kappa and log10 error ratio for --objective mix")
    p.add_argument("--model", default="stage", choices=["stage", "tc", "native"], help="precision model (emulate.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generations", type=int, default=60)
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--popsize", type=int, default=12)
    p.add_argument("--max-den", type=int, default=16, help="largest denominator when snapping")
    p.add_argument("--dyadic", action="store_true", help="snap to k/2^j (fp16-friendly constants)")
    p.add_argument("--asymmetric", action="store_true", help="search all points freely (default: 0 and +- pairs)")
    p.add_argument("-o", "--output", default=None, help="JSON path (default winograd_F{m}_{r}_{dtype}.json)")
    p.add_argument("--plot", default=None, help="plot path (default: the JSON path with .png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def _fmt(x: float, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    return "inf/NaN" if not math.isfinite(x) else format(x, spec)


def _rows(cands, std):
    for label, c in cands:
        yield [label, " ".join(str(p) for p in c.points) + " ∞", c.scaling, _fmt(c.kappa, ".4g"), _fmt(c.kappa ** 2, ".3g"),
               _fmt(std.kappa / c.kappa, ".3g") + "×", _fmt(c.err), _fmt(c.ratio, ".3g") + "×", str(c.max_den),
               "yes" if c.dyadic else "no",
               {True: "1D+2D", False: "FAILED", None: "1D"}[c.verified_2d] if c.verified_1d else "FAILED"]


def print_table(res, std, lib_best, dtype: str, model: str, console=None):
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    cfg = res.config
    tab = Table(title=f"F({cfg.m},{cfg.r}) Winograd points — κ = NOVA's finite Vandermonde κ₂; "
                      f"error = 2D {dtype} '{model}' model vs float64 direct")
    for col in ("set", "points", "scaling", "κ 1D", "κ 2D", "κ gain", "rel err", "vs direct", "max den", "dyadic", "verified"):
        tab.add_column(col, justify="left" if col in ("set", "points") else "right")
    rows = [("standard", std)]
    if lib_best is not None:
        rows.append(("library best", lib_best))
    rows += [(f"found #{i + 1} ({c.source.get('objective', '?')})", c) for i, c in enumerate(res.pareto)]
    for row in _rows(rows, std):
        tab.add_row(*row)
    console.print(tab)
    console.print(f"direct {dtype} error: {_fmt(std.err_direct)}; search: {res.stats['es_evals']} ES + "
                  f"{res.stats['refine_evals']} lattice evaluations, {res.stats['snapped']} snapped sets, "
                  f"{res.stats['verified']} verified, {res.stats['rejected']} rejected, {res.stats['seconds']:.1f} s")


def make_plot(path: Path, cfg, res, dtype: str, model: str) -> str | None:
    """2D error vs tile size: direct, standard points, library best, and this run's best."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from fxforge.passes.winograd import library
    from fxforge.passes.winograd.construct import standard_points
    from fxforge.passes.winograd.emulate import relative_error
    from fxforge.passes.winograd.search import SearchConfig, evaluate_points

    ms = sorted({e.m for e in library.entries(r=cfg.r)} | {cfg.m})
    series = {"direct": [], "standard (integer)": [], "library best": []}
    for m in ms:
        c_std = evaluate_points(standard_points(m, cfg.r), SearchConfig(m=m, r=cfg.r, dtype=dtype, model=model))
        series["standard (integer)"].append(c_std.err)
        series["direct"].append(c_std.err_direct)
        try:
            t = library.best(m, cfg.r, dtype).transform()
            series["library best"].append(relative_error(t, m, cfg.r, dtype, model).winograd)
        except KeyError:
            series["library best"].append(float("nan"))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    top = 1e1
    for name, ys in series.items():
        ys_plot = [y if math.isfinite(y) else top for y in ys]
        ax.plot(ms, ys_plot, marker="o", label=name)
        for m, y in zip(ms, ys):
            if not math.isfinite(y):
                ax.annotate("overflow", (m, top), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
    best = res.best("ratio") if res.pareto else None
    if best is not None:
        ax.plot([cfg.m], [best.err], marker="*", markersize=14, linestyle="none", label="this run's best")
    ax.set_yscale("log")
    ax.set_xlabel(f"output tile m of F(m×m, {cfg.r}×{cfg.r})")
    ax.set_ylabel(f"relative error vs float64 ({dtype}, '{model}' model)")
    ax.set_title("Winograd 2D error vs tile size: searched vs standard points")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def run(args) -> int:
    from rich.console import Console

    from fxforge.passes.winograd import library
    from fxforge.passes.winograd.metrics import full_report
    from fxforge.passes.winograd.search import SearchConfig, evaluate_points, search, standard_candidate
    from fxforge.passes.winograd.verify import verify

    console = Console(width=None if sys.stdout.isatty() else 160)
    t0 = time.perf_counter()
    cfg = SearchConfig(m=args.m, r=args.r, dtype=args.dtype, objectives=OBJECTIVE_SETS[args.objective],
                       weights=tuple(args.weights), symmetric=not args.asymmetric, generations=args.generations,
                       popsize=args.popsize, restarts=args.restarts, seed=args.seed, max_den=args.max_den,
                       dyadic=args.dyadic, model=args.model)
    res = search(cfg, progress=not args.no_progress)
    std = standard_candidate(cfg)
    try:
        e = library.best(cfg.m, cfg.r, cfg.dtype)
        lib_best = evaluate_points([p for p in e.points if p != "inf"], cfg, scalings=(e.scaling,))
        lib_best.verified_2d = e.verified
    except (KeyError, FileNotFoundError):
        lib_best = None
    print_table(res, std, lib_best, cfg.dtype, cfg.model, console)
    if not res.pareto:
        console.print("[red]no verified candidate survived[/red]")
        return 1

    best = res.best("ratio")
    t = best.transform(cfg.m, cfg.r)
    v = verify(t)
    entry = {
        "id": f"F({cfg.m},{cfg.r})/found/cli/{cfg.dtype}", "m": cfg.m, "r": cfg.r, "kind": "found",
        "objective": args.objective, "dtype": cfg.dtype, "points": t.points_str() + ["inf"], "scaling": t.scaling,
        "seed": cfg.seed, "source": "fxforge search-winograd",
        "verification": {"1d": v[1].ok, "2d": v[2].ok, "method": v[1].method},
        "metrics": full_report(t),
    }
    out = Path(args.output or f"winograd_F{cfg.m}_{cfg.r}_{cfg.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = None if args.no_plot else make_plot(Path(args.plot) if args.plot else out.with_suffix(".png"), cfg, res,
                                                cfg.dtype, cfg.model)
    cmd = (f"fxforge search-winograd --m {cfg.m} --r {cfg.r} --dtype {cfg.dtype} --objective {args.objective} "
           f"--model {cfg.model} --seed {cfg.seed} --generations {cfg.generations} --restarts {cfg.restarts}"
           + (" --dyadic" if cfg.dyadic else "") + (" --asymmetric" if args.asymmetric else ""))
    doc = {"command": cmd,
           "date": datetime.date.today().isoformat(), "entry": entry, "standard": std.to_dict(),
           "best_cond": res.best("kappa").to_dict(), "pareto": [c.to_dict() for c in res.pareto],
           "search": res.to_dict(), "plot": plot, "seconds": round(time.perf_counter() - t0, 2)}
    out.write_text(json.dumps(doc, indent=1, default=_default) + "\n")
    console.print(f"wrote {out}" + (f" and {plot}" if plot else " (matplotlib not installed: no plot)")
                  + f" in {doc['seconds']:.1f} s")
    return 0


def _default(o):
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


def main(argv=None) -> int:
    """Standalone entry (``python -m fxforge.winograd_cli ...``) until the main CLI wires it in."""
    import argparse

    ap = argparse.ArgumentParser(prog="fxforge")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_parser(sub)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
