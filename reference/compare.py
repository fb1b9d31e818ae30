"""Error metrics against the oracle and a conformance report table (DESIGN.md 'Correctness').

rel_l2 = ||x - ref|| / ||ref||, rel_max = max|x - ref| / max|ref|, angle states by circular
distance (and an angle outside [0, 2 pi) counts as infinitely wrong: states must be wrapped).
NaN or Inf anywhere in x (where ref is finite) makes every metric inf.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from .common import TWO_PI

# DESIGN.md bounds: bf16 inputs (fp32 accumulation and state); fp32 inputs ten times tighter.
BOUNDS = {
    "bfloat16": dict(rel_l2=1e-2, rel_max=5e-2, grad_rel_l2=2e-2, angle=1e-3),
    "float16": dict(rel_l2=1e-2, rel_max=5e-2, grad_rel_l2=2e-2, angle=1e-3),
    "float32": dict(rel_l2=1e-3, rel_max=5e-3, grad_rel_l2=2e-3, angle=1e-4),
    "float64": dict(rel_l2=1e-10, rel_max=1e-10, grad_rel_l2=1e-10, angle=1e-10),
}


def _arr(x):
    x = np.asarray(x, dtype=np.float64)
    return x


def _bad(x, ref):
    return not np.all(np.isfinite(x)[np.isfinite(ref)])


def rel_l2(x, ref) -> float:
    x, ref = _arr(x), _arr(ref)
    if x.shape != ref.shape:
        raise ValueError(f"x: expected shape {ref.shape} (the reference's), got {x.shape}")
    if _bad(x, ref):
        return float("inf")
    den = np.linalg.norm(ref)
    num = np.linalg.norm(x - ref)
    return float(num / den) if den > 0 else float(num)


def rel_max(x, ref) -> float:
    x, ref = _arr(x), _arr(ref)
    if x.shape != ref.shape:
        raise ValueError(f"x: expected shape {ref.shape} (the reference's), got {x.shape}")
    if _bad(x, ref):
        return float("inf")
    if x.size == 0:
        return 0.0
    den = np.max(np.abs(ref))
    num = np.max(np.abs(x - ref))
    return float(num / den) if den > 0 else float(num)


def angle_error(x, ref) -> float:
    """Max circular distance in radians; a value (of either side) outside [0, 2 pi) gives inf."""
    x, ref = _arr(x), _arr(ref)
    if x.shape != ref.shape:
        raise ValueError(f"x: expected shape {ref.shape} (the reference's), got {x.shape}")
    if x.size == 0:
        return 0.0
    if _bad(x, ref):
        return float("inf")
    for a in (x, ref):  # both sides must be wrapped states
        if np.any(a < 0) or np.any(a >= TWO_PI + 1e-6):
            return float("inf")
    d = np.abs(x - ref) % TWO_PI
    return float(np.max(np.minimum(d, TWO_PI - d)))


@dataclasses.dataclass
class Row:
    case: str
    name: str
    rel_l2: float
    rel_max: float
    bound_l2: float
    bound_max: float
    bound_note: str = ""     # why the bounds are above DESIGN.md's fixed ones ("" where they are not)

    @property
    def ok(self) -> bool:
        return self.rel_l2 <= self.bound_l2 and self.rel_max <= self.bound_max

    def widened(self, bound_l2: float, bound_max: float, note: str) -> "Row":
        """This row held to the larger of its bounds and the given ones, noting why where larger."""
        l2, mx = max(self.bound_l2, bound_l2), max(self.bound_max, bound_max)
        if (l2, mx) == (self.bound_l2, self.bound_max):
            return self
        return dataclasses.replace(self, bound_l2=l2, bound_max=mx, bound_note=note)


def compare_outputs(case: str, got: dict, ref: dict, dtype: str = "bfloat16",
                    kind: str = "forward") -> list:
    """Rows for each named tensor in ref; names starting with 'angle' use the circular metric.
    kind 'grad' uses the gradient bound (rel_l2 only)."""
    b = BOUNDS[dtype]
    rows = []
    for name, r in ref.items():
        if r is None:
            continue
        g = got[name]
        if name.startswith("angle") or name == "state.angle":
            e = angle_error(g, r)
            rows.append(Row(case, name, e, e, b["angle"], b["angle"]))
        elif kind == "grad":
            rows.append(Row(case, name, rel_l2(g, r), rel_max(g, r), b["grad_rel_l2"], float("inf")))
        else:
            rows.append(Row(case, name, rel_l2(g, r), rel_max(g, r), b["rel_l2"], b["rel_max"]))
    return rows


class Report:
    """A list of rows printed as a table (plain text; rich if installed and asked for)."""

    def __init__(self, rows: Optional[list] = None):
        self.rows = list(rows or [])

    def extend(self, rows):
        self.rows.extend(rows)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def failures(self) -> list:
        return [r for r in self.rows if not r.ok]

    def table(self) -> str:
        head = f"{'case':<44} {'tensor':<14} {'rel_l2':>10} {'rel_max':>10} {'bound':>9}    ok"
        lines = [head, "-" * len(head)]
        notes = []
        for r in self.rows:
            mark = ""
            if r.bound_note:
                notes += [r.bound_note] if r.bound_note not in notes else []
                mark = "*" * (notes.index(r.bound_note) + 1)
            lines.append(f"{r.case[:44]:<44} {r.name[:14]:<14} {r.rel_l2:10.2e} {r.rel_max:10.2e} "
                         f"{r.bound_l2:9.1e}{mark:<3} {'yes' if r.ok else 'NO'}")
        lines += [f"{'*' * (i + 1)} {n}" for i, n in enumerate(notes)]
        return "\n".join(lines)

    def to_json(self) -> list:
        return [dataclasses.asdict(r) | {"ok": r.ok} for r in self.rows]
