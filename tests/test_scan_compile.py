"""`mamba3_kernels.scan` under torch.compile (mamba3_kernels/scan_op.py): one opaque op per call,
fullgraph, forward and every gradient bitwise equal to the eager call's; the ops' schemas, fakes
and autograd registration checked by torch.library.opcheck. CPU: the Triton kernels run in the
interpreter (conftest), inside the compiled graph's real op calls."""
import pytest
import torch

import mamba3_kernels as m3
from mamba3_kernels import scan_op
from mamba3_kernels.scan_testing import scan_inputs
from mamba3_kernels.spec import Problem, ScanSpec, States

SISO = ScanSpec(d_state=16, head_dim=16, n_angles=4, has_d=True, has_z=True, input_dtype="float32",
                initial_states=True, final_states=True)
MIMO = ScanSpec(d_state=16, head_dim=8, rank=2, n_angles=8, pairing="half", has_d=True, has_z=True,
                has_mimo_v=True, has_mimo_z=True, has_mimo_out=True, output_mode="norm_reduce",
                shared_angles=True, varlen=True, input_dtype="bfloat16")


def _inputs(spec, rng):
    if spec.varlen:
        return scan_inputs(spec, Problem(1, 45, 4, 2, 3), rng, lengths=[20, 0, 25])
    return scan_inputs(spec, Problem(2, 37, 2, 1, 2), rng)


def _opts(spec):
    return dict(output_mode=spec.output_mode, pairing=spec.pairing, final_states=spec.final_states)


def _leaves(a, grad):
    """Fresh leaf copies of every float input (requiring grad if asked)."""
    b = {}
    for n, x in a.items():
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            b[n] = x.detach().clone().requires_grad_(grad)
        elif n == "initial_states" and x is not None:
            b[n] = States(*(y.detach().clone().requires_grad_(grad) for y in x))
        else:
            b[n] = x
    return b


def _grads(b):
    g = {n: x.grad for n, x in b.items() if isinstance(x, torch.Tensor) and x.is_floating_point()}
    if b.get("initial_states") is not None:
        g.update({f"initial_states.{f}": x.grad for f, x in zip(States._fields, b["initial_states"])})
    return g


@pytest.mark.parametrize("spec", [SISO, MIMO], ids=["siso-states", "mimo-norm-varlen"])
def test_compiled_scan_equals_eager(spec, rng):
    a = _inputs(spec, rng)

    def loss(x):
        res = m3.scan(**x, **_opts(spec))
        out, st = res if spec.final_states else (res, None)
        val = (out.float() ** 2).sum()
        if st is not None:   # final states are differentiable outputs too
            val = val + st.ssm.sum() + (st.k ** 2).sum() + st.angle.sum()
        return val

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(_leaves(a, False)), loss(_leaves(a, False)))
    e, c = _leaves(a, True), _leaves(a, True)
    le, lc = loss(e), compiled(c)
    assert torch.equal(le, lc)
    le.backward()
    lc.backward()
    ge, gc = _grads(e), _grads(c)
    assert set(ge) == set(gc)
    for n in ge:
        assert (ge[n] is None) == (gc[n] is None), n
        if ge[n] is not None:
            assert gc[n].shape == ge[n].shape and gc[n].dtype == ge[n].dtype, n
            assert torch.equal(gc[n], ge[n]), n


def test_compiled_scan_errors_and_out(rng):
    a = _inputs(SISO, rng)
    f = torch.compile(lambda x, out=None: m3.scan(**x, **_opts(SISO), out=out), backend="aot_eager",
                      fullgraph=True)
    bad = dict(a, dt=a["dt"][:, :, :5])
    with pytest.raises(Exception, match=r"dt: expected shape"):   # raised when the graph runs
        f(bad)
    out = torch.full_like(a["v"], float("nan"))
    got, _ = f(a, out)
    want, _ = m3.scan(**a, **_opts(SISO))
    assert got is out and torch.equal(out, want)


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "autograd"])
def test_opcheck_scan_fwd(grad, rng):
    a = _leaves(_inputs(SISO, rng), grad)
    st = a["initial_states"]
    flat = [a[n] for n in scan_op.INPUTS[:15]] + list(st) + [a["cu_seqlens"]]
    args = (*flat, "", "interleaved", "trapezoidal", True, 1e-5, 64, "float32", "", "", "", True, grad, True)
    torch.library.opcheck(torch.ops.mamba3.scan_fwd.default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_scan_gpu_inductor(mode, rng):
    """On the GPU with Inductor (and CUDA graphs for reduce-overhead): a projection feeding the
    scan compiles with fullgraph; the scan's output equals the eager block's bitwise and every
    gradient (through Inductor's own kernels for the projection) to rel_l2 <= 1e-3."""
    spec = ScanSpec(d_state=64, head_dim=32, n_angles=16, has_d=True, has_z=True, input_dtype="bfloat16")
    a = {n: (x.cuda() if isinstance(x, torch.Tensor) else x)
         for n, x in scan_inputs(spec, Problem(2, 300, 4, 1, 2), rng).items()}
    w = torch.randn(32, 32, device="cuda", dtype=torch.bfloat16) / 6
    gout = torch.randn(2, 300, 4, 32, device="cuda", dtype=torch.bfloat16)

    def block(x):
        return m3.scan(**dict(x, v=x["v"] @ w), **_opts(spec))

    compiled = torch.compile(block, mode=None if mode == "default" else mode, fullgraph=True)
    e, c = _leaves(a, True), _leaves(a, True)
    for _ in range(3 if mode == "reduce-overhead" else 1):   # later calls replay the CUDA graph
        for x in c.values():
            if isinstance(x, torch.Tensor):
                x.grad = None
        oc = compiled(c)
        oc.backward(gout)
    oe = block(e)
    oe.backward(gout)
    assert torch.equal(oe, oc)
    ge, gc = _grads(e), _grads(c)
    for n in ge:
        if ge[n] is not None:
            err = (gc[n].double() - ge[n].double()).norm() / ge[n].double().norm().clamp_min(1e-30)
            assert err <= 1e-3, (n, float(err))
