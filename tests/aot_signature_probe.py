"""Subprocess body of tests/test_aot_signature.py (AOT builds need a process without
TRITON_INTERPRET): a call that leaves out a defaulted constexpr must build the same program as
one that passes the default, and a different one from a non-default value."""
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, sys.argv[1])
from mamba3_kernels.backends.triton.aot import build  # noqa: E402


@triton.jit
def probe_kernel(x_ptr, n, A: tl.constexpr = True, B: tl.constexpr = 2):
    i = tl.arange(0, 16)
    x = tl.load(x_ptr + i, mask=i < n, other=0.0)
    if A:
        x = x * B
    tl.store(x_ptr + i, x + 1.0, mask=i < n)


def call(**consts):
    return dict(name="probe", kernel=probe_kernel, grid=(1,), args=[("x_ptr", torch.empty(16, device="meta")),
                                                                     ("n", 7)],
                constexprs=consts, num_warps=1)


if __name__ == "__main__":
    def sass(**consts):
        from triton.backends.compiler import GPUTarget
        from mamba3_kernels.backends.triton.aot import signature
        sig, attrs, cs = signature(call(**consts))
        src = triton.compiler.ASTSource(fn=probe_kernel, signature=sig, constexprs=cs, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1}).asm["ptx"]
    omitted, default, other = sass(B=3), sass(A=True, B=3), sass(A=False, B=3)
    assert omitted == default, "omitting the defaulted constexpr A changed the build"
    assert omitted != other, "A=False built the same program (the probe cannot tell)"
    assert build([call(B=3)])[0]["registers"] > 0
    try:
        build([call(A=True, B=3, C=1)])
    except ValueError as e:
        assert "C" in str(e)
    else:
        raise AssertionError("an argument the kernel does not have was accepted")
    print("ok")
