"""AOT-compile the Triton decode step for sm_90a without a GPU; the default config must not spill
(unless it caps its registers on purpose, see test_default_configs_do_not_spill).

The compile runs in a subprocess WITHOUT TRITON_INTERPRET (AOT and the interpreter do not mix
in one process, see CPU-TOOLCHAINS.md). Registers / local memory come from the cubin through
the cuobjdump bundled with Triton; the table is printed (pytest -s) and attached to the test
report as the property "sm90a_resources".
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import json, sys
    from mamba3_kernels.spec import Problem, ScanSpec
    from mamba3_kernels.backends import triton as tb

    main = ScanSpec(d_state=128, head_dim=64)                       # SISO decode, bf16 in, fp32 state
    mimo = ScanSpec(d_state=128, head_dim=64, rank=4, n_angles=32, pairing="half", has_d=True,
                    has_z=True, has_mimo_v=True, has_mimo_z=True, has_mimo_out=True,
                    output_mode="norm_reduce")
    big, one = Problem(64, 1, 32, 1, 64), Problem(1, 1, 32, 1, 1)
    jobs = []                                                        # (name, spec, config, is default)
    for name, spec in (("siso", main), ("mimo4-norm", mimo)):        # the whole space
        d = tb.default_config(spec, big)
        jobs += [(name, spec, c, c == d) for c in tb.space(spec, big)]
    others = {
        "siso-bf16state": main.replace(state_dtype="bfloat16"),
        "mimo4-reduce-bf16state": mimo.replace(output_mode="reduce", state_dtype="bfloat16"),
        "mimo4-reduce-fp32state": mimo.replace(output_mode="reduce"),
        "mimo2-per_rank-N64-P48": ScanSpec(d_state=64, head_dim=48, rank=2, n_angles=16,
                                           has_z=True, has_mimo_v=True, output_mode="per_rank"),
        "siso-fp32-euler-shared": ScanSpec(d_state=128, head_dim=64, n_angles=32, shared_angles=True,
                                           discretization="euler", has_d=True,
                                           input_dtype="float32"),
    }
    for k, s in others.items():
        for pname, prob in (("B64", big), ("B1", one)):
            jobs.append((f"{k}-{pname}", s, tb.default_config(s, prob), True))
    jobs.append(("siso+state_indices", main, dict(tb.default_config(main, big), _has_idx=True), True))
    seen, rows = set(), []
    for name, spec, cfg, is_default in jobs:
        key = (spec, json.dumps(cfg, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        r = tb.compile(spec, cfg, "step", arch="sm_90a")
        rows.append(dict(name=name, config=cfg, default=is_default,
                         registers=r["registers"], spills=r["spills"], shared=r["shared"],
                         cubin_bytes=len(r["cubin"]), elf=r["cubin"][:4] == b"\x7fELF",
                         sm90a=".target sm_90a" in (r["ptx"] or "")))
    json.dump(rows, sys.stdout)
''')


@pytest.fixture(scope="module")
def resources(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cache = tmp_path_factory.mktemp("triton-cache")
    env.update(TRITON_CACHE_DIR=str(cache), TRITON_HOME=str(cache), TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-6000:]
    rows = json.loads(r.stdout)
    print("\nTriton decode step, sm_90a (AOT):")
    print(f"{'case':30s} {'config':40s} {'regs':>5s} {'spill':>6s} {'smem':>6s}")
    for x in rows:
        c = x["config"]
        cs = (f"ROWS={c.get('ROWS', '-')} BLOCK_P={c['BLOCK_P']} w={c['num_warps']}{' VEC' if c.get('VEC') else ''}"
              f"{' PREFETCH' if c.get('PREFETCH') else ''}{' idx' if c.get('_has_idx') else ''}"
              f"{' DOT' if c.get('DOT') else ''}{' maxnreg=%d' % c['maxnreg'] if c.get('maxnreg') else ''}")
        print(f"{x['name']:30s} {cs:40s} {x['registers']:5d} {x['spills']:6d} "
              f"{x['shared']:6d}{'  (default)' if x['default'] else ''}")
    return rows


def test_every_config_compiles_for_sm90a(resources, record_property):
    record_property("sm90a_resources", json.dumps(resources))
    assert len(resources) >= 10
    for x in resources:
        assert x["elf"] and x["sm90a"] and x["cubin_bytes"] > 1000, x
        assert isinstance(x["registers"], int) and 0 < x["registers"] <= 255, x


def test_default_configs_do_not_spill(resources):
    """No default spills, except a default that caps its registers on purpose (maxnreg: the
    MIMO DOT path, measured faster with the cap and a few spilled bytes than without it,
    bench/notes/step.md); that one may spill at most 128 bytes per thread."""
    bad = [x for x in resources if x["default"] and x["spills"] > (128 if x["config"].get("maxnreg") else 0)]
    assert not bad, "default config spills:\n" + "\n".join(json.dumps(x) for x in bad)
