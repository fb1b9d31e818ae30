"""mamba3-kernels: Mamba-3 scan kernels in Triton, TileLang and CuTe DSL, with a float64 oracle.

`backends/`, `autotune/` and `reference/` live at the top of the repository and are installed
as `mamba3_kernels.backends`, `mamba3_kernels.autotune` and `mamba3_kernels.reference`.
"""
from setuptools import setup

PKGS = {
    "mamba3_kernels": "mamba3_kernels",
    "mamba3_kernels.reference": "reference",
    "mamba3_kernels.autotune": "autotune",
    "mamba3_kernels.backends": "backends",
    "mamba3_kernels.backends.triton": "backends/triton",
    "mamba3_kernels.backends.tilelang": "backends/tilelang",
    "mamba3_kernels.backends.cute": "backends/cute",
}

TRITON = ["triton>=3.6"]
TILELANG = ["tilelang==0.1.15", "apache-tvm-ffi==0.1.12"]
CUTE = ["nvidia-cutlass-dsl==4.8.1"]
DEV = ["pytest>=8", "hypothesis>=6", "matplotlib", "rich", "tqdm", "ruff"]

setup(
    name="mamba3-kernels",
    version="0.1.0",
    description="Mamba-3 state-space scan kernels (Triton, TileLang, CuTe DSL) with an autotuner and a float64 oracle",
    python_requires=">=3.10",
    packages=list(PKGS),
    package_dir=PKGS,
    install_requires=["numpy>=1.24", "torch>=2.4"],
    extras_require={
        "triton": TRITON, "tilelang": TILELANG, "cute": CUTE,
        "all": TRITON + TILELANG + CUTE, "dev": DEV,
    },
    entry_points={"console_scripts": ["mamba3-kernels=mamba3_kernels.cli:main"]},
)
