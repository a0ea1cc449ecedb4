"""The shipped point-set library (`pointsets.json`, package data) and its query API.

Every entry records where it came from (objective, dtype, seed, search settings, or the literature
source for reference sets), its metrics, and its exact verification status. The file is written by
`python -m fxforge.passes.winograd.build_library`. Entries are re-verified (1D, exact) when turned
into a Transform, so a hand-edited or corrupted file cannot feed an unverified transform to a pass.

    from fxforge.passes.winograd import library
    e = library.best(6, 3, dtype="fp16")          # lowest fp16 error ratio among verified entries
    t = e.transform()                              # exact Transform (A^T, G, B^T as sympy Rationals)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .construct import Transform, toom_cook
from .verify import require_verified

FILENAME = "pointsets.json"


@dataclass(frozen=True)
class LibraryEntry:
    raw: dict

    @property
    def id(self) -> str:
        return self.raw["id"]

    @property
    def m(self) -> int:
        return self.raw["m"]

    @property
    def r(self) -> int:
        return self.raw["r"]

    @property
    def kind(self) -> str:          # "standard" | "found" | "reference"
        return self.raw["kind"]

    @property
    def objective(self) -> str | None:
        return self.raw.get("objective")

    @property
    def dtype(self) -> str | None:
        return self.raw.get("dtype")

    @property
    def points(self) -> list[str]:
        return self.raw["points"]

    @property
    def scaling(self) -> str:
        return self.raw["scaling"]

    @property
    def verified(self) -> bool:
        v = self.raw.get("verification", {})
        return bool(v.get("1d") and v.get("2d"))

    @property
    def kappa(self) -> float:
        return self.raw["metrics"]["cond"]["kappa_vandermonde_finite_1d"]

    def ratio(self, dtype: str = "fp16", model: str = "stage") -> float:
        return self.raw["metrics"]["error"][dtype][model]["ratio"]

    def transform(self, verify: bool = True) -> Transform:
        t = toom_cook(self.m, self.r, [p for p in self.points if p != "inf"], self.scaling)
        return require_verified(t, dims=(1,)) if verify else t


def default_path() -> Path:
    return Path(str(resources.files(__package__).joinpath(FILENAME)))


@lru_cache(maxsize=4)
def _load(path: str) -> tuple:
    doc = json.loads(Path(path).read_text())
    return doc, tuple(LibraryEntry(e) for e in doc["entries"])


def load(path=None) -> list[LibraryEntry]:
    return list(_load(str(path or default_path()))[1])


def document(path=None) -> dict:
    return _load(str(path or default_path()))[0]


def entries(m=None, r=None, kind=None, objective=None, dtype=None, path=None) -> list[LibraryEntry]:
    out = []
    for e in load(path):
        if (m is None or e.m == m) and (r is None or e.r == r) and (kind is None or e.kind == kind) \
                and (objective is None or e.objective == objective) and (dtype is None or e.dtype == dtype):
            out.append(e)
    return out


def standard(m: int, r: int = 3, path=None) -> LibraryEntry:
    return entries(m, r, kind="standard", path=path)[0]


def best(m: int, r: int = 3, dtype: str = "fp16", by: str = "error", model: str = "stage", path=None) -> LibraryEntry:
    """The verified entry for F(m, r) with the lowest `dtype` error ratio (by="error") or the lowest
    NOVA kappa (by="cond"), over all kinds (a standard set wins if nothing beats it)."""
    cands = [e for e in entries(m, r, path=path) if e.verified]
    if not cands:
        raise KeyError(f"no verified point set for F({m},{r}) in the library")
    if by == "cond":
        return min(cands, key=lambda e: e.kappa)
    return min(cands, key=lambda e: (e.ratio(dtype, model), e.kappa))


def found(m: int, r: int = 3, objective: str = "error", dtype: str | None = "fp16", path=None) -> LibraryEntry:
    """The search's own best entry for an objective (found sets only)."""
    es = entries(m, r, kind="found", objective=objective, dtype=dtype if objective != "cond" else None, path=path)
    if not es:
        raise KeyError(f"no found F({m},{r}) entry for objective={objective} dtype={dtype}")
    return es[0]
