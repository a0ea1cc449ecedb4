"""NOVA-style search for well-conditioned, low-error Winograd points.

Pipeline (each step exists because the previous one cannot be trusted on its own):
  1. CMA-ES over the n-1 finite points as a real vector (optionally +-symmetric pairs, 0 kept for
     odd n), minimising a configurable objective:
        cond   log10 kappa of the finite-point Vandermonde (NOVA's definition, see metrics)
        error  log10 of the empirical 2D error ratio vs direct in `dtype`, "stage" precision model,
               constants rounded to the dtype (fixed search data, common random numbers)
        proxy  log10 of the analytic 2D error amplification W2 (smooth, cheap)
        mix    weights[0] * cond + weights[1] * error
     kappa alone is a misleading objective (anchors-passes §5.4: close fractional points lower
     kappa but blow up G/B^T entries), hence the error objectives and the Pareto set.
  2. Snap each run's best vector to simple rationals (bounded denominators, or dyadic) and refine on
     the lattice by coordinate descent with the same objective.
  3. Build every snapped candidate exactly, try each scaling placement, and verify it exactly
     (1D polynomial identity over Q); anything that fails is dropped and counted.
  4. Keep the Pareto set over (kappa, error ratio); verify its members in 2D too.
Everything random comes from numpy Generators spawned from `seed`, so a run is reproducible.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .construct import SCALINGS, Transform, numeric_transform, standard_points, toom_cook
from .emulate import canon_dtype, direct_tiles, make_data, rel_err, relative_error, winograd_tiles
from .es import CMAES
from .metrics import error_amplification, kappa_nova, range_report
from .snap import expand, n_params, refine, snap_value, valid_points
from .verify import verify_1d, verify_2d

DENOMINATORS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)
PENALTY = 30.0   # log10 units: worse than any finite objective value


@dataclass
class SearchConfig:
    m: int
    r: int = 3
    dtype: str = "fp16"
    objectives: tuple = ("cond", "error")
    weights: tuple = (0.5, 0.5)
    symmetric: bool = True
    generations: int = 60
    popsize: int = 12
    restarts: int = 2
    seed: int = 0
    max_den: int = 16
    dyadic: bool = False
    dyadic_bits: int = 5
    sigma0: float = 0.3
    model: str = "stage"
    verify_2d: bool = True
    search_data: dict = field(default_factory=lambda: {"tiles": 48, "channels": 8, "filters": 4, "seed": 1234})
    eval_data: dict = field(default_factory=lambda: {"tiles": 128, "channels": 16, "filters": 8, "seed": 0})


@dataclass
class Candidate:
    points: tuple
    scaling: str
    kappa: float            # NOVA's kappa (finite Vandermonde), 1D
    ratio: float            # 2D error / direct error, config.dtype, config.model, eval data
    err: float
    err_direct: float
    W2: float
    max_den: int
    dyadic: bool
    verified_1d: bool
    verified_2d: bool | None = None
    headroom: float = float("inf")   # metrics.range_report(...)["headroom"] in config.dtype
    source: dict = field(default_factory=dict)

    def transform(self, m: int, r: int) -> Transform:
        return toom_cook(m, r, self.points, self.scaling)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["points"] = [str(p) for p in self.points] + ["inf"]
        d["kappa_2d"] = self.kappa ** 2
        return d


def balance_numeric(AT, G, BT):
    """The 'balanced' scaling for float matrices: power-of-two factors into A and B, rest into G."""
    AT, G, BT = AT.copy(), G.copy(), BT.copy()
    for i in range(G.shape[0]):
        a, g, b = np.abs(AT[:, i]).max(), np.abs(G[i]).max(), np.abs(BT[i]).max()
        if min(a, g, b) == 0:
            continue
        target = (a * g * b) ** (1 / 3)
        sa, sb = 2.0 ** np.rint(np.log2(target / a)), 2.0 ** np.rint(np.log2(target / b))
        AT[:, i] *= sa
        BT[i] *= sb
        G[i] /= sa * sb
    return AT, G, BT


class Objective:
    """Callable point-list -> float (lower is better); counts its evaluations."""

    def __init__(self, kind: str, cfg: SearchConfig):
        if kind not in ("cond", "error", "proxy", "mix"):
            raise ValueError(f"unknown objective {kind!r}")
        self.kind, self.cfg, self.calls = kind, cfg, 0
        if kind in ("error", "mix"):
            sd = cfg.search_data
            self.data = make_data(cfg.m, cfg.r, sd["tiles"], sd["channels"], sd["filters"], sd["seed"])
            self.ref = direct_tiles(*self.data, cfg.m)
            self.e_dir = rel_err(direct_tiles(*self.data, cfg.m, cfg.dtype, cfg.model), self.ref)

    def _log_ratio(self, pts) -> float:
        mats = balance_numeric(*numeric_transform(pts, self.cfg.m, self.cfg.r))
        e = rel_err(winograd_tiles(mats, *self.data, self.cfg.dtype, self.cfg.model), self.ref)
        return float(np.log10(e / self.e_dir)) if np.isfinite(e) else PENALTY

    def __call__(self, pts) -> float:
        self.calls += 1
        x = np.array([float(p) for p in pts])
        if not valid_points(list(x), 1e-4) or np.abs(x).max() > 16:
            return PENALTY + float(np.abs(x).max())
        with np.errstate(all="ignore"):
            if self.kind == "cond":
                return float(np.log10(kappa_nova(x)))
            if self.kind == "proxy":
                W2 = error_amplification(numeric_transform(x, self.cfg.m, self.cfg.r), self.cfg.r)["W2"]
                return float(np.log10(W2)) if np.isfinite(W2) else PENALTY
            if self.kind == "error":
                return self._log_ratio(x)
            wc, we = self.cfg.weights
            return wc * float(np.log10(kappa_nova(x))) + we * self._log_ratio(x)


def _x0(n: int, k: int, symmetric: bool, rng) -> np.ndarray:
    """Start near an evenly spread set of magnitudes in (0, 1.5], jittered by the run's generator."""
    if symmetric:
        base = np.linspace(1.5 / k, 1.5, k) if k else np.zeros(0)
    else:
        base = np.linspace(-1.5, 1.5, n)
    return base + rng.normal(0, 0.1, base.shape)


def run_es(obj: Objective, cfg: SearchConfig, rng, on_gen=None):
    """One CMA-ES run; returns (best params, best value)."""
    n = cfg.m + cfg.r - 2
    k = n_params(n, cfg.symmetric)
    es = CMAES(_x0(n, k, cfg.symmetric, rng), cfg.sigma0, rng, cfg.popsize)
    for _ in range(cfg.generations):
        X = es.ask()
        f = [obj(expand(list(np.abs(x)) if cfg.symmetric else list(x), n, cfg.symmetric)) for x in X]
        es.tell(X, np.array(f))
        if on_gen:
            on_gen()
        if es.converged():
            break
    best = np.abs(es.best_x) if cfg.symmetric else es.best_x
    return best, es.best_f


def lattices(cfg: SearchConfig):
    if cfg.dyadic:
        return [{"bits": b} for b in range(1, cfg.dyadic_bits + 1)]
    return [{"max_den": d} for d in DENOMINATORS if d <= cfg.max_den]


MIN_HEADROOM = 8.0   # typical intermediates must stay 8x below the dtype's max (see metrics.range_report)


def evaluate_points(points, cfg: SearchConfig, data=None, scalings=SCALINGS) -> Candidate | None:
    """Exact construction, choice of scaling placement, 1D verification. None if verification fails.

    The scaling is the one with the lowest error ratio among those whose typical intermediates keep
    `MIN_HEADROOM` below the dtype's max with 1024 channels (or, if none does, the one with the most
    headroom): on a 16-channel workload an unbalanced placement can win by 1% and then overflow fp16
    at 256 channels, which real layers have.
    """
    ed = cfg.eval_data
    data = data if data is not None else make_data(cfg.m, cfg.r, ed["tiles"], ed["channels"], ed["filters"], ed["seed"])
    options = []
    for sc in scalings:
        t = toom_cook(cfg.m, cfg.r, points, sc)
        e = relative_error(t, cfg.m, cfg.r, cfg.dtype, cfg.model, data=data)
        head = range_report(t, cfg.dtype)["headroom"]
        options.append((e.ratio if np.isfinite(e.ratio) else np.inf, head, t, e))
    safe = [o for o in options if o[1] >= MIN_HEADROOM]
    _, head, t, e = min(safe, key=lambda o: o[0]) if safe else max(options, key=lambda o: o[1])
    v = verify_1d(t)
    if not v.ok:
        return None
    return Candidate(points=t.points, scaling=t.scaling, kappa=kappa_nova(t.points), ratio=e.ratio, err=e.winograd,
                     err_direct=e.direct, W2=error_amplification(t, cfg.r)["W2"], max_den=t.max_denominator(),
                     dyadic=t.is_dyadic(), verified_1d=True, headroom=head)


def pareto(cands: list[Candidate]) -> list[Candidate]:
    """Non-dominated candidates over (kappa, error ratio), sorted by ratio. Point complexity is bounded
    by the lattice instead of being a third objective (which would keep every integer set)."""
    key = lambda c: (c.kappa, c.ratio if np.isfinite(c.ratio) else np.inf)
    cands = sorted(cands, key=lambda c: (key(c), c.max_den))   # among equals keep the simplest
    out = []
    for c in cands:
        kc = key(c)
        dominated = any(all(a <= b for a, b in zip(key(o), kc)) and key(o) != kc for o in cands)
        if not dominated and all(o.points != c.points for o in out):
            out.append(c)
    return sorted(out, key=lambda c: (c.ratio, c.kappa))


@dataclass
class SearchResult:
    config: SearchConfig
    pareto: list
    candidates: list
    stats: dict

    def best(self, by: str = "ratio") -> Candidate:
        return min(self.pareto, key=lambda c: (getattr(c, by), c.ratio, c.kappa))

    def to_dict(self) -> dict:
        cfg = asdict(self.config)
        cfg["objectives"] = list(cfg["objectives"])
        return {"config": cfg, "pareto": [c.to_dict() for c in self.pareto], "stats": self.stats}


def search(cfg: SearchConfig, progress: bool = True) -> SearchResult:
    cfg.dtype = canon_dtype(cfg.dtype)
    n = cfg.m + cfg.r - 2
    t0 = time.perf_counter()
    seqs = np.random.SeedSequence(cfg.seed).spawn(len(cfg.objectives) * cfg.restarts)
    runs = [(obj, i) for obj in cfg.objectives for i in range(cfg.restarts)]
    stats = {"es_evals": 0, "refine_evals": 0, "snapped": 0, "verified": 0, "rejected": 0, "runs": []}
    prog = _progress(progress)
    seeds_out = {}
    with prog:
        t_es = prog.add_task(f"F({cfg.m},{cfg.r}) CMA-ES", total=len(runs) * cfg.generations)
        objs = {k: Objective(k, cfg) for k in cfg.objectives}
        for (kind, i), ss in zip(runs, seqs):
            rng = np.random.default_rng(ss)
            x, f = run_es(objs[kind], cfg, rng, on_gen=lambda: prog.advance(t_es))
            seeds_out[(kind, i)] = (x, f)
            stats["runs"].append({"objective": kind, "restart": i, "best_value": f, "best_params": [float(v) for v in x]})
        prog.update(t_es, completed=len(runs) * cfg.generations)
        stats["es_evals"] = sum(o.calls for o in objs.values())

        # Snap + refine each run's best on each lattice, with the run's own objective.
        snapped = {}
        lats = lattices(cfg)
        t_sn = prog.add_task("snapping to rationals", total=len(runs) * len(lats))
        for (kind, i), (x, f) in seeds_out.items():
            for lat in lats:
                params = [snap_value(v, **lat) for v in x]
                if cfg.symmetric:
                    params = [p if p > 0 else snap_value(1.0, **lat) for p in params]
                before = objs[kind].calls
                params, val, _ = refine(params, objs[kind], n, cfg.symmetric, **lat)
                stats["refine_evals"] += objs[kind].calls - before
                pts = tuple(sorted(expand(params, n, cfg.symmetric), key=lambda p: (abs(p), p < 0)))
                if valid_points(pts) and pts not in snapped:
                    snapped[pts] = {"objective": kind, "restart": i, "lattice": lat, "value": val}
                prog.advance(t_sn)
        stats["snapped"] = len(snapped)

        # Exact construction + verification + evaluation on the held-out workload.
        ed = cfg.eval_data
        data = make_data(cfg.m, cfg.r, ed["tiles"], ed["channels"], ed["filters"], ed["seed"])
        t_ev = prog.add_task("verifying + evaluating", total=len(snapped))
        cands = []
        for pts, src in snapped.items():
            c = evaluate_points(pts, cfg, data)
            prog.advance(t_ev)
            if c is None:
                stats["rejected"] += 1
                continue
            stats["verified"] += 1
            c.source = dict(src, seed=cfg.seed)
            cands.append(c)
        front = pareto(cands)
        if cfg.verify_2d:
            t_v2 = prog.add_task("2D verification of the Pareto set", total=len(front))
            for c in front:
                c.verified_2d = verify_2d(c.transform(cfg.m, cfg.r)).ok
                prog.advance(t_v2)
            front = [c for c in front if c.verified_2d]
    stats["seconds"] = time.perf_counter() - t0
    return SearchResult(cfg, front, cands, stats)


def standard_candidate(cfg: SearchConfig) -> Candidate:
    """The integer points, evaluated the same way (best scaling), for comparison tables."""
    c = evaluate_points(standard_points(cfg.m, cfg.r), cfg)
    c.source = {"objective": "standard integer points"}
    return c


class _NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass


def _progress(enabled: bool):
    if not enabled:
        return _NullProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
