"""Merging tuning results of separate processes (Triton+CuTe, Triton+TileLang) on one GPU."""
import json
import subprocess
import sys

import pytest

from mamba3_kernels.autotune.merge import merge_entries

BASE = {"op": "step", "gpu": "NVIDIA H100 80GB HBM3", "cc": "9.0", "sm_count": 132, "driver": "580",
        "torch": "2.11.0", "triton": "3.6.0", "mamba3_kernels": "0.1.0",
        "spec": {"d_state": 128, "head_dim": 64, "rank": 1}, "shape": {"B": 64, "L": 1, "H": 32, "G": 1,
                                                                      "N": 128, "P": 64, "R": 1}}


def _entry(tilelang, cute, backend, t, triton_t, others=()):
    key = dict(BASE, tilelang=tilelang, cutlass_dsl=cute)
    by = {backend: {"config": {"x": 1}, "time_us": t}, "triton": {"config": {"BLOCK_P": 64}, "time_us": triton_t}}
    return {"key": key, "backend": backend, "config": {"x": 1}, "time_us": t,
            "runners_up": [{"backend": b, "config": {"y": i}, "time_us": tt} for i, (b, tt) in enumerate(others)],
            "best_by_backend": by}


def test_fastest_of_both_processes_wins_with_full_versions():
    a = _entry("none", "4.8.1", "cute", 50.0, 58.0, [("cute", 51.0)])
    b = _entry("0.1.15", "none", "tilelang", 49.0, 58.5, [("tilelang", 53.0)])
    (m,) = merge_entries([a, b])
    assert m["backend"] == "tilelang" and m["time_us"] == 49.0
    assert m["key"]["tilelang"] == "0.1.15" and m["key"]["cutlass_dsl"] == "4.8.1"
    assert m["merge_yardstick"]['triton {"BLOCK_P": 64}'] == [58.0, 58.5] and m["merge_reliable"] is True
    assert [r["backend"] for r in m["runners_up"]][:2] == ["cute", "cute"]
    assert len(m["merged_from"]) == 2


def test_unreliable_when_the_yardstick_moves():
    a = _entry("none", "4.8.1", "cute", 50.0, 58.0)
    b = _entry("0.1.15", "none", "tilelang", 49.0, 70.0)
    (m,) = merge_entries([a, b], tolerance=0.05)
    assert m["merge_reliable"] is False


def test_yardstick_needs_the_same_config_in_both():
    """Budgeted tunes time different subsets: two different Triton configs are no common measure;
    the default (built first by every process) is."""
    a = _entry("none", "4.8.1", "cute", 50.0, 58.0)
    b = _entry("0.1.15", "none", "tilelang", 49.0, 61.0)
    b["best_by_backend"]["triton"]["config"] = {"BLOCK_P": 32}
    (m,) = merge_entries([a, b])
    assert m["merge_yardstick"] == {} and m["merge_reliable"] is False
    for e, t in ((a, 70.0), (b, 71.0)):
        e["default_by_backend"] = {"triton": {"config": {"BLOCK_P": 16}, "time_us": t}}
    (m,) = merge_entries([a, b])
    assert m["merge_yardstick"] == {'triton {"BLOCK_P": 16}': [70.0, 71.0]} and m["merge_reliable"] is True


def test_conflicting_versions_and_singletons():
    a = _entry("0.1.14", "none", "tilelang", 50.0, 58.0)
    b = _entry("0.1.15", "none", "tilelang", 49.0, 58.0)
    with pytest.raises(ValueError, match="expected one tilelang version"):
        merge_entries([a, b])
    c = _entry("none", "4.8.1", "cute", 50.0, 58.0)
    c["key"]["shape"] = dict(BASE["shape"], B=256)
    assert merge_entries([c]) == [c]


def test_cli_merge(tmp_path):
    a = _entry("none", "4.8.1", "cute", 50.0, 58.0)
    b = _entry("0.1.15", "none", "tilelang", 52.0, 58.2)
    paths = []
    for name, e in (("a.json", a), ("b.json", b)):
        p = tmp_path / name
        p.write_text(json.dumps({"format": "mamba3-kernels-tune-cache", "version": 1, "entries": {"k": e}}))
        paths.append(str(p))
    out = tmp_path / "merged.json"
    r = subprocess.run([sys.executable, "-m", "mamba3_kernels", "tune", "--merge", *paths, "--cache", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1 combined across processes" in r.stdout
    ents = list(json.loads(out.read_text())["entries"].values())
    assert len(ents) == 1 and ents[0]["backend"] == "cute" and ents[0]["key"]["tilelang"] == "0.1.15"
