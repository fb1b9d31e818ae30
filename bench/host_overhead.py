"""Host-side overhead of our layers per decode step, with a no-op backend (runs on a CPU).

    python bench/host_overhead.py

Times, per call: `mamba3_kernels.step` (validation + dispatch with a warm memo), `StepPlan`
(per-token checks only), `dispatch.select` alone (warm), and the direct backend call. The
backend does nothing, so every µs here is ours; on a GPU add the DSL's own launch cost
(bench/NOTES.md, "Host overhead").
"""
import sys
import time
import types

import numpy as np

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

import mamba3_kernels as m3  # noqa: E402
from mamba3_kernels import backends, dispatch  # noqa: E402
from mamba3_kernels.spec import Problem, ScanSpec  # noqa: E402
from mamba3_kernels.testing import step_inputs  # noqa: E402


def per_call(fn, n=3000):
    for _ in range(50):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main():
    noop = types.SimpleNamespace(NAME="noop", available=lambda: (True, ""), supports=lambda s, o: (True, ""),
                                 default_config=lambda s, p, o: {}, step=lambda spec, cfg, t: None)
    backends.get = lambda name: noop
    dispatch.PREFERENCE["step"] = ("noop",)
    spec = ScanSpec(d_state=128, head_dim=64, n_angles=32, has_d=True, has_z=True, chunk_size=1,
                    initial_states=True, final_states=True)
    prob = Problem(1, 1, 32, 1, 1)
    a = step_inputs(spec, prob, np.random.default_rng(0))
    plan = m3.StepPlan(**a)
    tok = {n: a[n] for n in ("q", "k", "v", "adt", "dt", "trap", "angles", "z")}
    t = plan._t
    rows = {
        "mamba3_kernels.step (validate + dispatch)": per_call(lambda: m3.step(**a)),
        "StepPlan call (per-token checks)": per_call(lambda: plan(**tok)),
        "dispatch.select (warm memo)": per_call(lambda: dispatch.select("step", spec, prob, "cpu")),
        "backend.step direct (no-op)": per_call(lambda: noop.step(spec, {}, t)),
    }
    for k, v in rows.items():
        print(f"{k:<45} {v:7.2f} us")


if __name__ == "__main__":
    main()
