"""A compact CMA-ES (Hansen's (mu/mu_w, lambda)-CMA-ES with rank-one and rank-mu updates and
cumulative step-size adaptation), in numpy, for the point search's <= 9 dimensions.

Written here rather than imported (pycma) to keep the dependency set at numpy + sympy and to make
the run fully determined by the numpy Generator passed in (reproducible with a seed).
"""
from __future__ import annotations

import numpy as np


class CMAES:
    def __init__(self, x0, sigma0: float, rng: np.random.Generator, popsize: int | None = None):
        self.n = n = len(x0)
        self.rng = rng
        self.mean = np.asarray(x0, dtype=np.float64).copy()
        self.sigma = float(sigma0)
        self.lam = lam = popsize or 4 + int(3 * np.log(n))
        self.mu = mu = lam // 2
        w = np.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
        self.w = w / w.sum()
        self.mueff = mueff = 1.0 / (self.w ** 2).sum()
        self.cc = (4 + mueff / n) / (n + 4 + 2 * mueff / n)
        self.cs = (mueff + 2) / (n + mueff + 5)
        self.c1 = 2 / ((n + 1.3) ** 2 + mueff)
        self.cmu = min(1 - self.c1, 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
        self.damps = 1 + 2 * max(0.0, np.sqrt((mueff - 1) / (n + 1)) - 1) + self.cs
        self.chiN = np.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
        self.pc = np.zeros(n)
        self.ps = np.zeros(n)
        self.C = np.eye(n)
        self.B = np.eye(n)
        self.D = np.ones(n)
        self.gen = 0
        self.best_x, self.best_f = self.mean.copy(), np.inf

    def ask(self) -> np.ndarray:
        z = self.rng.standard_normal((self.lam, self.n))
        return self.mean + self.sigma * (z * self.D) @ self.B.T

    def tell(self, X: np.ndarray, f: np.ndarray) -> None:
        f = np.asarray(f, dtype=np.float64)
        order = np.argsort(f, kind="stable")        # stable: ties resolved deterministically
        if f[order[0]] < self.best_f:
            self.best_f, self.best_x = float(f[order[0]]), X[order[0]].copy()
        sel = X[order[: self.mu]]
        old = self.mean
        self.mean = self.w @ sel
        yw = (self.mean - old) / self.sigma
        invsqrtC = self.B @ np.diag(1 / self.D) @ self.B.T
        self.ps = (1 - self.cs) * self.ps + np.sqrt(self.cs * (2 - self.cs) * self.mueff) * invsqrtC @ yw
        self.gen += 1
        hsig = np.linalg.norm(self.ps) / np.sqrt(1 - (1 - self.cs) ** (2 * self.gen)) / self.chiN < 1.4 + 2 / (self.n + 1)
        self.pc = (1 - self.cc) * self.pc + hsig * np.sqrt(self.cc * (2 - self.cc) * self.mueff) * yw
        art = (sel - old) / self.sigma
        self.C = ((1 - self.c1 - self.cmu) * self.C
                  + self.c1 * (np.outer(self.pc, self.pc) + (1 - hsig) * self.cc * (2 - self.cc) * self.C)
                  + self.cmu * (art.T * self.w) @ art)
        self.sigma *= np.exp((self.cs / self.damps) * (np.linalg.norm(self.ps) / self.chiN - 1))
        self.C = (self.C + self.C.T) / 2
        ev, self.B = np.linalg.eigh(self.C)
        self.D = np.sqrt(np.maximum(ev, 1e-20))

    def converged(self, tol: float = 1e-9) -> bool:
        return self.sigma * self.D.max() < tol
