"""Merge tuning results that separate processes measured on the same GPU with different DSLs.

On the lent H100 the TileLang and the CuTe DSL bundles cannot travel in one call (45 + 57 MB
over a 64 MiB limit), so the three-backend choice is tuned as two processes on the same GPU
(Triton + CuTe, Triton + TileLang). Their cache entries differ only in the versions of the DSL
each process lacked ("none"). `merge_entries` combines such entries into one keyed for the
environment that has every DSL, choosing the fastest candidate measured by either process.
A (backend, config) timed in both processes (a Triton config: every process builds each
backend's default first) is the yardstick: the spread of its times across the processes is
recorded, and an entry whose spread exceeds `tolerance` (or that has no yardstick) is marked
`"merge_reliable": false` (dispatch still uses it; `tune --list` shows it). Versions that disagree (two different tilelang versions) are never merged.
"""
from __future__ import annotations

import json

from .cache import key_string

DSL_FIELDS = ("tilelang", "cutlass_dsl")
_NONE = (None, "none", "")


def _base(key: dict) -> str:
    return json.dumps({f: v for f, v in key.items() if f not in DSL_FIELDS}, sort_keys=True)


def merge_entries(entries: list, tolerance: float = 0.05) -> list:
    """Entries with the same key up to the DSL versions merged (see the module docstring);
    entries with nothing to merge with are returned as they are."""
    groups: dict = {}
    for e in entries:
        groups.setdefault(_base(e["key"]), []).append(e)
    out = []
    for es in groups.values():
        if len(es) == 1:
            out.append(es[0])
            continue
        key = dict(es[0]["key"])
        for f in DSL_FIELDS:
            vals = {e["key"].get(f) for e in es} - set(_NONE)
            if len(vals) > 1:
                raise ValueError(f"entries: expected one {f} version per GPU environment to merge, got {sorted(vals)}")
            key[f] = vals.pop() if vals else "none"
        cands = []
        for i, e in enumerate(es):
            cands.append((float(e["time_us"]), e["backend"], e["config"], i))
            cands += [(float(r["time_us"]), r["backend"], r["config"], i) for r in e.get("runners_up", [])]
            cands += [(float(r["time_us"]), b, r["config"], i) for b, r in e.get("best_by_backend", {}).items()]
            cands += [(float(r["time_us"]), b, r["config"], i) for b, r in e.get("default_by_backend", {}).items()]
        cands.sort(key=lambda c: c[0])
        best = cands[0]
        # the yardstick: one (backend, config) timed by several processes (budgeted tunes time
        # different subsets, so a backend's best alone is no common measure)
        same: dict = {}
        for t, b, c, i in cands:
            d = same.setdefault((b, json.dumps(c, sort_keys=True)), {})
            d[i] = min(d.get(i, float("inf")), t)
        yard = {f"{b} {c}": sorted(d.values()) for (b, c), d in same.items() if len(d) > 1}
        spread = max((v[-1] / v[0] - 1 for v in yard.values()), default=None)
        merged = dict(es[best[3]])
        merged.update(
            key=key, backend=best[1], config=best[2], time_us=best[0],
            runners_up=_unique([{"backend": b, "config": c, "time_us": t} for t, b, c, _ in cands])[1:6],
            merged_from=[key_string(e["key"]) for e in es],
            merge_yardstick={b: v for b, v in yard.items()},
            merge_reliable=spread is not None and spread <= tolerance)
        out.append(merged)
    return out


def _unique(rows: list) -> list:
    seen, out = set(), []
    for r in rows:
        k = (r["backend"], json.dumps(r["config"], sort_keys=True))
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def merge_files(paths: list, cache, tolerance: float = 0.05) -> tuple:
    """Merge the entries of the cache files `paths` and write them into `cache` (a Cache).
    Returns (entries written, how many of them were merged from several processes)."""
    entries = []
    for p in paths:
        entries += _load(p)
    merged = merge_entries(entries, tolerance)
    cache.put_many(merged)
    return len(merged), sum(1 for e in merged if "merged_from" in e)


def _load(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"path: expected a readable tuning-cache file, got {path!r} ({e})") from None
    ents = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(ents, dict):
        raise ValueError(f"path: expected a tuning-cache file with an 'entries' object, got {path!r}")
    return list(ents.values())
