"""Greedy pairwise covering arrays for the CPU test grids (deterministic for a seed).

`covering_rows(factors, possible, seed)` returns rows (dicts factor -> value) such that every
pair of values of two factors that `possible` allows appears in some row; each new row is the
best of `tries` random rows seeded with one still-uncovered pair. `all_pairs` / `pairs` let a test
assert the array is complete.
"""
from __future__ import annotations

import itertools

import numpy as np


def _allowed(row: dict) -> bool:
    return True


def pairs(row: dict) -> set:
    keys = sorted(row)
    return {(a, row[a], b, row[b]) for a, b in itertools.combinations(keys, 2)}


def all_pairs(factors: dict, possible=_allowed) -> set:
    return {(a, va, b, vb) for a, b in itertools.combinations(sorted(factors), 2)
            for va in factors[a] for vb in factors[b] if possible({a: va, b: vb})}


def covering_rows(factors: dict, possible=_allowed, seed: int = 0, tries: int = 200) -> list:
    keys = sorted(factors)
    need = all_pairs(factors, possible)
    rng = np.random.default_rng(seed)
    rows = []
    while need:
        best, best_cov = None, -1
        for _ in range(tries):
            row = {k: factors[k][rng.integers(len(factors[k]))] for k in keys}
            a, va, b, vb = sorted(need)[rng.integers(len(need))]
            row[a], row[b] = va, vb
            if not possible(row):
                continue
            cov = len(pairs(row) & need)
            if cov > best_cov:
                best, best_cov = row, cov
        if best is None:
            raise RuntimeError(f"covering_rows: no possible row in {tries} tries (seed {seed})")
        rows.append(best)
        need -= pairs(best)
    return rows
