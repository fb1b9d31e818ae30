"""`python -m mamba3_kernels ...` is the `mamba3-kernels` command."""
import sys

from .cli import main

sys.exit(main())
