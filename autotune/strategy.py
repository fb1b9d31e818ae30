"""Search strategies: which candidates to build, and how to spend timing on them.

* `priority(candidates)`: most promising first (every backend's default, then round-robin over
  the backends by each one's optional `rank(spec, problem, config, op)`, else spread evenly over
  its space): the order builds run in, so a tuning time budget keeps the best-ranked ones.
* `prune(candidates, max_candidates)`: for very large spaces, the first `max_candidates` of
  that order (defaults always kept). The rest are recorded as pruned, not silently dropped.
* `Exhaustive`: every candidate gets `reps` samples (small spaces).
* `SuccessiveHalving(eta)`: rounds that bring every survivor to `min_reps`, then eta times
  more, ... (capped at `reps`; samples accumulate), keeping the fastest 1/eta each round until
  `keep` remain; those end with `reps` samples.
* `choose(n)`: Exhaustive up to `threshold` candidates, else SuccessiveHalving.

Strategies are pure logic: `run(items, measure, reps, keep)` with `measure(item, n) -> median
or None` (None = it failed; it is dropped). They return [(item, median)] fastest first.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence


def priority(cands: Sequence, spec=None, problem=None, op: str = "step") -> list:
    """Every candidate, most promising first: each backend's default, then round-robin over the
    backends, each in its own `rank(spec, problem, config, op)` order (else spread evenly over
    its space). Builds run in this order, so a time budget that ends the build stage early
    keeps the defaults and a fair share of every backend's best-ranked configs."""
    by_backend: dict = {}
    for c in cands:
        by_backend.setdefault(c.backend, []).append(c)
    queues = []
    for cs in by_backend.values():
        default = [c for c in cs if c.is_default]
        rest = [c for c in cs if not c.is_default]
        rank = getattr(cs[0].module, "rank", None) if cs[0].module is not None else None
        if rank is not None:
            try:
                rest.sort(key=lambda c: rank(spec, problem, c.config, op))
            except Exception:
                rest = _spread(rest)
        else:
            rest = _spread(rest)
        queues.append((default, rest))
    out = [c for d, _ in queues for c in d]
    i = 0
    while any(i < len(r) for _, r in queues):
        out += [r[i] for _, r in queues if i < len(r)]
        i += 1
    return out


def prune(cands: Sequence, max_candidates: Optional[int], spec=None, problem=None, op: str = "step"):
    """(kept, pruned) with len(kept) <= max(max_candidates, number of defaults): the first
    `max_candidates` of `priority` (defaults always stay), in the original order."""
    cands = list(cands)
    if max_candidates is None or len(cands) <= max_candidates:
        return cands, []
    if max_candidates < 1:
        raise ValueError(f"max_candidates: expected an int >= 1 or None, got {max_candidates!r}")
    order = priority(cands, spec, problem, op)
    kept = [c for c in order if c.is_default]
    for c in order:
        if len(kept) >= max_candidates:
            break
        if not c.is_default:
            kept.append(c)
    ids = {id(c) for c in kept}
    return [c for c in cands if id(c) in ids], [c for c in cands if id(c) not in ids]


def _spread(xs: list) -> list:
    """Reorder so any prefix samples the list evenly (bit-reversal-like: ends, middle, quarters...)."""
    n = len(xs)
    if n <= 2:
        return list(xs)
    order, seen = [], set()
    step = n
    while step >= 1 and len(order) < n:
        for j in range(0, n, step):
            if j not in seen:
                seen.add(j)
                order.append(j)
        step //= 2
    order += [j for j in range(n) if j not in seen]
    return [xs[j] for j in order]


class Exhaustive:
    name = "exhaustive"

    def run(self, items: Sequence, measure: Callable, reps: int, keep: int = 3) -> list:
        res = []
        for it in items:
            m = measure(it, reps)
            if m is not None:
                res.append((it, m))
        res.sort(key=lambda im: im[1])
        return res


class SuccessiveHalving:
    def __init__(self, eta: int = 3, min_reps: int = 5):
        if eta < 2:
            raise ValueError(f"eta: expected an int >= 2, got {eta!r}")
        self.eta, self.min_reps = eta, min_reps
        self.name = f"successive-halving(eta={eta})"

    def run(self, items: Sequence, measure: Callable, reps: int, keep: int = 3) -> list:
        keep = max(1, keep)
        alive = list(items)
        done: list = []          # (item, median) eliminated in earlier rounds
        given = {id(it): 0 for it in alive}
        target = min(self.min_reps, reps)   # cumulative samples per survivor this round
        while len(alive) > keep:
            scored = []
            for it in alive:
                n = max(0, target - given[id(it)])
                m = measure(it, n)
                given[id(it)] += n
                if m is not None:
                    scored.append((it, m))
            scored.sort(key=lambda im: im[1])
            n_keep = max(keep, math.ceil(len(scored) / self.eta))
            done = scored[n_keep:] + done
            alive = [it for it, _ in scored[:n_keep]]
            if len(scored) <= keep:
                break
            target = min(target * self.eta, reps)
        final = []
        for it in alive:
            m = measure(it, max(0, reps - given[id(it)]))
            if m is not None:
                final.append((it, m))
        final.sort(key=lambda im: im[1])
        return final + sorted(done, key=lambda im: im[1])


def choose(n: int, threshold: int = 16, name: Optional[str] = None):
    """A strategy by name ("exhaustive", "halving", "auto") for n candidates."""
    if name in (None, "auto"):
        return Exhaustive() if n <= threshold else SuccessiveHalving()
    if name == "exhaustive":
        return Exhaustive()
    if name in ("halving", "successive-halving"):
        return SuccessiveHalving()
    raise ValueError(f"strategy: expected 'auto', 'exhaustive' or 'halving', got {name!r}")
