"""Shared harness of the AOT compile tests: build a test file's cases for sm_90a in worker
subprocesses (without TRITON_INTERPRET: the interpreter and AOT builds do not mix), collect the
per-kernel registers / spills / shared memory, keep a copy under .cache/, print the table.

A compile test module defines `_worker(idx, n, out_path)` (builds cases idx, idx + n, ... and
writes a JSON list of {name, config, kernels | error}) and runs it when executed as a script;
its `results` fixture calls `run(__file__, tmp_dir, cache_name)`; its tests assert on
`build_errors`, `spills` and `oversized_shared` of those results.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(test_file: str, tmp_dir, cache_name: str, n: int = 2, timeout: float = 1500, python: str = None,
        env_extra: dict = None) -> list:
    """Run the test file's workers (with `python`, default this interpreter; `env_extra` on top of
    the environment, e.g. another Triton's cache directory) and collect their results."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", os.path.join(ROOT, ".cache", "triton"))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env.update(env_extra or {})
    procs, paths = [], []
    for i in range(n):
        p = os.path.join(str(tmp_dir), f"w{i}.json")
        paths.append(p)
        procs.append(subprocess.Popen([python or sys.executable, test_file, str(i), str(n), p], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [pr.communicate(timeout=timeout)[0] for pr in procs]
    res = []
    for pr, p, log in zip(procs, paths, logs):
        assert pr.returncode == 0, log[-4000:]
        with open(p) as f:
            res.extend(json.load(f))
    os.makedirs(os.path.join(ROOT, ".cache"), exist_ok=True)
    with open(os.path.join(ROOT, ".cache", cache_name), "w") as f:
        json.dump(res, f, indent=1)
    print("\n{:<34} {:<26} {:>5} {:>7} {:>7}".format("case", "kernel", "regs", "spills", "shared"))
    for r in res:
        for k in r.get("kernels", []):
            print(f"{r['name'][:34]:<34} {k['name'][:26]:<26} {k['registers']:>5} {k['spills']:>7} {k['shared']:>7}")
    return res


SM_SHARED_BYTES = 227 * 1024   # H100: shared memory one block may use


def build_errors(results) -> list:
    return [f"{r['name']}: {r['error']}" for r in results if "error" in r]


def spills(results) -> list:
    """One line per kernel that spills (a default config must not)."""
    return [f"{r['name']} {k['name']}: {k['spills']} spill bytes, {k['registers']} registers, config {r['config']}"
            for r in results for k in r.get("kernels", []) if k["spills"]]


def oversized_shared(results) -> list:
    return [f"{r['name']} {k['name']}: {k['shared']} bytes" for r in results for k in r.get("kernels", [])
            if k["shared"] > SM_SHARED_BYTES]
