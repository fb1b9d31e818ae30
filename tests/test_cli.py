"""The package imports and reports without any DSL; the CLI answers."""
import subprocess
import sys

BLOCK = """
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('triton', 'tilelang', 'cutlass', 'tvm_ffi', 'quack'):
            raise ModuleNotFoundError(f"No module named '{name}' (blocked by the test)")
        return None
sys.meta_path.insert(0, _Block())
"""


def _run(code):
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=300)


def test_import_without_any_dsl():
    p = _run("import mamba3_kernels, mamba3_kernels.reference as r; print(sorted(mamba3_kernels.backends_info()))")
    assert p.returncode == 0, p.stderr
    assert "['cute', 'tilelang', 'triton']" in p.stdout


def test_info_names_what_is_missing():
    p = _run("from mamba3_kernels.cli import main; raise SystemExit(main(['info']))")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split("\nbackends\n")[1].splitlines()
    for name in ("triton", "tilelang", "cute"):
        line = next(ln for ln in lines if ln.strip().startswith(name + " "))
        assert "unavailable" in line, line
    assert "gpu" in p.stdout


def test_oracle_does_not_import_torch():
    code = ("import sys; import mamba3_kernels.reference as r; import mamba3_kernels.spec;"
            "print('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


def test_cli_info_module_entry():
    p = subprocess.run([sys.executable, "-m", "mamba3_kernels", "info"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "mamba3-kernels" in p.stdout and "backends" in p.stdout


def test_cli_rejects_unknown_command():
    p = subprocess.run([sys.executable, "-m", "mamba3_kernels", "frobnicate"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and "invalid choice" in p.stderr


def test_validate_scan_section_reports_every_gradient(capsys):
    """`validate`'s scan section: out, the four final states and every gradient of the Triton
    scan (interpreter here) against the oracle, one row each, all within bounds."""
    from mamba3_kernels.cli import _scan_section, scan_grid
    rows = []
    assert _scan_section(rows, on_gpu=False)
    out = capsys.readouterr().out
    assert out.count("gradients worst/bound") == len(scan_grid(False))
    names = {r["name"] for r in rows if r["case"].startswith("scan/triton siso gqa")}
    assert {"out", "state.angle", "state.ssm", "grad.q", "grad.angles", "grad.initial_states.ssm",
            "grad.initial_states.angle", "grad.d", "grad.z"} <= names
    assert all(r["ok"] for r in rows)


def test_validate_tilelang_phase4_section_says_why_it_did_not_run(capsys):
    """Without a GPU the TileLang phase 4 rows (OUT_IMPL "tilelang") are not run, and the report
    says so (its GPU run: the same function with on_gpu=True, bench/tilelang_fwd_job.sh)."""
    from mamba3_kernels.cli import _tilelang_phase4_section, tilelang_phase4_grid
    rows = []
    assert _tilelang_phase4_section(rows, on_gpu=False)
    assert "not run here: no GPU" in capsys.readouterr().out and rows == []
    assert all(s.d_state in (64, 128) and s.head_dim == 64 and s.rank == 1 for _, s, _, _ in tilelang_phase4_grid())
