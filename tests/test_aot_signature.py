"""aot.signature (the AOT builds CI's compile tests and the spill guards' stand-ins rely on):
a defaulted constexpr left out of a call gets its default, as the JIT does. Before, the later
constexprs shifted into its place and the build silently was a different program (a kernel
whose DO_K was left out compiled to an empty body). Runs in a subprocess without
TRITON_INTERPRET (AOT and the interpreter must not share a process)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_omitted_defaulted_constexpr_builds_its_default():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "aot_signature_probe.py"), ROOT],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]
