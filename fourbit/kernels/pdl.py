"""Programmatic dependent launch (PDL, sm_90+): a kernel launched with it may start while the kernel before it on
the stream is still running, so its launch, and whatever it reads that no earlier kernel writes (a GEMM's
weights), overlap the previous kernel's tail. Decode steps are chains of short kernels, where this counts.

Which kernels: the fused elementwise kernels, paged attention and its combine step, and the W4A16 ring kernel
(M <= 16). Not the wgmma and mma W4A16 kernels: with PDL the wgmma kernel measured slower at M = 64
(benchmarks/NOTES-serving.md). Kernels launched without PDL (those, torch's, cuBLAS) keep ordinary stream order.

The rule every PDL kernel keeps: `griddepcontrol.wait` (the previous kernel has finished and its writes are
visible) comes before any read of an activation and before any write, and every program executes it, so a
finished kernel implies that all earlier ones have finished. Before it a kernel reads only what no PDL kernel
writes: weights, the step's metadata and RoPE angles (made by the host and by torch before the layers), and the
KV-cache rows of earlier steps (paged attention asks L2 for them). Then it lets the next kernel launch
(`griddepcontrol.launch_dependents`): the small kernels right after the wait, the GEMM after its K loop. So at
most one kernel waits ahead, never a chain of them. FOURBIT_PDL=0 turns PDL off.
"""
from __future__ import annotations

import functools
import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import capability


def pdl_args(t) -> dict:
    """The launch arguments of a kernel with a `PDL` constexpr that reads tensor `t`: PDL on a CUDA device of
    compute capability >= 9.0, off elsewhere (older GPUs, the interpreter)."""
    on = t.is_cuda and _supported(t.device.index)
    return dict(PDL=on, launch_pdl=on)


@functools.cache
def _supported(device_index: int) -> bool:
    return os.environ.get("FOURBIT_PDL", "1") != "0" and capability(device_index) >= (9, 0)


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """A PDL kernel's first statement: wait for the previous kernel, then let the next one launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
