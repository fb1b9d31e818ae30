"""What the TileLang compile tests share: the environment a CPU build of sm_90a cubins needs
(CUDA_HOME for the system nvcc, a TileLang cache inside the checkout) and whether nvcc is here."""
import os
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parents[1]


def setup_env() -> None:
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    os.environ.setdefault("TILELANG_CACHE_DIR", str(ROOT / ".cache" / "tilelang"))


def nvcc_ok() -> bool:
    return shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")


NO_NVCC = "no nvcc: TileLang cannot build cubins here"
