"""What the TileLang compile tests share: the environment a CPU build of sm_90a cubins needs
(CUDA_HOME for the system nvcc, a TileLang cache inside the checkout) and whether nvcc is here."""
import os
import pathlib
import re
import shutil

ROOT = pathlib.Path(__file__).resolve().parents[1]


def setup_env() -> None:
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    os.environ.setdefault("TILELANG_CACHE_DIR", str(ROOT / ".cache" / "tilelang"))


def nvcc_ok() -> bool:
    return shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")


NO_NVCC = "no nvcc: TileLang cannot build cubins here"


_BYTES = {"float": 4, "bfloat16_t": 2, "half_t": 2, "int": 4}
_TMA_DST = r"tma_load\(\w+, [^,]+, \(&\(\(\((\w+)\*\)\w+\)\[(.*?)\]\)\)"   # (type, offset) of the destination


def misaligned_tma_destinations(src: str) -> list:
    """The tma_load destinations of generated CUDA whose shared-memory offset is not a multiple of
    128 bytes (the bulk tensor copy's requirement: a 64-byte step, the cs row at R = 4, faulted
    with "misaligned shared address" on the H100): every integer term of the offset expression
    (each `x * k` and `+ k`), times the element size, must be a multiple of 128."""
    bad = []
    n = len(re.findall(r"tma_load\(", src))
    assert n == len(re.findall(_TMA_DST, src)), "a tma_load whose destination the check cannot parse"
    for m in re.finditer(_TMA_DST, src):
        size = _BYTES[m.group(1)]
        consts = [int(k) for k in re.findall(r"[*+] \(?(\d+)\)?", m.group(2))]
        if any(k * size % 128 for k in consts):
            bad.append(m.group(0)[:160])
    return bad
