"""Shape buckets for the tuning cache: B and L rounded up to powers of two, the rest exact.

A cache entry is keyed by the *bucket* of a problem, so B = 5, 6, 7, 8 share the entry tuned
for any of them. When no entry exists for a problem's bucket, `nearest` picks the closest
bucket among the entries that agree on everything else (GPU, versions, spec, H, G, N, P, R),
by distance in log2 space:

    d = |log2 B_bucket - log2 B'| + |log2 L_bucket - log2 L'|

ties prefer the same L, then the larger bucket (a config tuned for more work rarely
launches too few blocks), then the smaller key (deterministic).
Pure Python.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

SHAPE_FIELDS = ("B", "L", "H", "G", "N", "P", "R")
BUCKETED = ("B", "L")


def pow2_bucket(n: int, arg: str = "n") -> int:
    """The smallest power of two >= n (n >= 1); 0 stays 0 (an empty problem)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{arg}: expected an int >= 0, got {n!r}")
    if n <= 1:
        return n
    return 1 << (n - 1).bit_length()


def log2i(n: int) -> int:
    """log2 of a power of two (0 maps to -1, below every real bucket)."""
    return n.bit_length() - 1


def shape_bucket(spec, problem) -> dict:
    """{"B", "L" (bucketed), "H", "G", "N", "P", "R" (exact)} for a ScanSpec and a Problem."""
    return {"B": pow2_bucket(problem.batch, "problem.batch"),
            "L": pow2_bucket(problem.seqlen, "problem.seqlen"),
            "H": problem.nheads, "G": problem.ngroups,
            "N": spec.d_state, "P": spec.head_dim, "R": spec.rank}


def shape_str(shape: dict) -> str:
    """'B=8 L=1 H=32 G=1 N=128 P=64 R=1' (the order of SHAPE_FIELDS)."""
    return " ".join(f"{f}={shape[f]}" for f in SHAPE_FIELDS)


def exact_part(shape: dict) -> tuple:
    """The fields a nearest-bucket fallback must match exactly."""
    return tuple(shape[f] for f in SHAPE_FIELDS if f not in BUCKETED)


def distance(a: dict, b: dict) -> tuple:
    """Sort key of bucket b as a stand-in for bucket a (smaller is nearer)."""
    dB = abs(log2i(a["B"]) - log2i(b["B"]))
    dL = abs(log2i(a["L"]) - log2i(b["L"]))
    return (dB + dL, dL, -(b["B"] + b["L"]))


def nearest(target: dict, shapes: Iterable[dict]) -> Optional[dict]:
    """The shape among `shapes` nearest to `target` that agrees on H, G, N, P, R; None if none."""
    want = exact_part(target)
    best, best_d = None, None
    for s in shapes:
        if exact_part(s) != want:
            continue
        d = distance(target, s) + (shape_str(s),)
        if best_d is None or d < best_d:
            best, best_d = s, d
    return best


def grid(values: Sequence[int]) -> list:
    """The distinct buckets of a list of sizes, sorted (for bench/tune sweeps)."""
    return sorted({pow2_bucket(v) for v in values})
