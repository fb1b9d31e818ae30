"""The NumPy float64 oracle (`mamba3_kernels.reference`): the definition every backend is checked against.

- recurrent: the time loop (SPEC §2, §3, §5, §7): `forward`, `step`
- adjoint:   every gradient by the reverse loop (SPEC §9.1): `backward`
- chunked:   the chunked form phase by phase (SPEC §8), to localise kernel bugs: `forward_chunked`
- compare:   error metrics (rel_l2, rel_max, circular angle error) and report tables
- inputs:    canonical layouts and random inputs

Pure NumPy: importing it never imports torch.
"""
from .recurrent import forward, step
from .adjoint import backward
from .chunked import forward_chunked
from .compare import rel_l2, rel_max, angle_error, compare_outputs, Report
from .inputs import random_scan_inputs, random_step_inputs, spec_options

__all__ = ["forward", "step", "backward", "forward_chunked", "rel_l2", "rel_max", "angle_error",
           "compare_outputs", "Report", "random_scan_inputs", "random_step_inputs", "spec_options"]
