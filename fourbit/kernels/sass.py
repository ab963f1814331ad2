"""Offline sm_90 compile of a Triton/Gluon kernel on any machine (Triton ships ptxas and cuobjdump): registers,
shared memory and the SASS instruction list, for tests and probes that check what a kernel compiles to."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget


@dataclass
class CompiledSM90:
    regs: int
    stack: int
    shared: int  # static shared memory of the cubin
    smem: int  # bytes of shared memory a launch asks for (Triton's allocation)
    sass_ops: list[str]  # opcodes in program order, e.g. "LDG.E.128"
    sass: str
    ttgir: str
    ptx: str


def compile_sm90(fn, dtype: str, constexprs: dict, num_warps: int, maxnreg: int | None = None) -> CompiledSM90:
    """Compile the W4A16 kernel signature (x, qweight, scales, zeros, bias, out, M, N, K, KT, TILES_PER_SPLIT
    [, ws, counts]) for sm_90 with X of `dtype` ("bf16"/"fp16"); pointers, N and K are taken as 16-aligned, as
    torch's allocations and Llama's sizes are (the runtime specializes on it). A first argument named x_desc is
    X's TMA descriptor, with (BLOCK_M, 64) boxes (the first part's: w4a16_gemm.tile_parts), and x_desc2 the
    second part's; a second named w_desc the packed weights' (R·num_warps rows of 256 words). maxnreg caps
    registers per thread (a warp-specialized kernel's partitions share them)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from .w4a16_gemm import W_SMEM_LAYOUT, X_SMEM_LAYOUT, tile_parts

    names = list(fn.arg_names)
    x, w = f"*{dtype}", "*i32"
    parts = tile_parts(constexprs["BLOCK_M"])
    box = lambda rows: f"tensordesc<{dtype}[{rows}, 64],{X_SMEM_LAYOUT!r}>"  # noqa: E731
    if names[0] == "x_desc":
        x = box(parts[0])
    if names[1] == "w_desc":
        w = f"tensordesc<i32[{constexprs['R'] * num_warps}, 256],{W_SMEM_LAYOUT!r}>"
    types = [x, w, "*fp16", "*u8", f"*{dtype}", "*fp32", "i32", "i32", "i32", "i32", "i32"]
    types += ["*fp32", "*i32"] if "ws_ptr" in names else []  # the split-K workspace and counters
    if "x_desc2" in names:  # the X box of a tile's second part (the first's where there is none)
        types.append(box(parts[-1]))
    sig = {name: (types[i] if i < len(types) else "constexpr") for i, name in enumerate(names)}
    aligned = [names.index(a) for a in names[:6] + ["N", "K"] + [a for a in ("ws_ptr", "count_ptr") if a in names]]
    src = GluonASTSource(fn, sig, constexprs, attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    options = {"num_warps": num_warps} | ({"maxnreg": maxnreg} if maxnreg else {})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-sass", path],
                              capture_output=True, text=True, check=True).stdout
    field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))  # noqa: E731
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass, re.M)
    return CompiledSM90(field("REG"), field("STACK"), field("SHARED"), kernel.metadata.shared, ops, sass,
                        kernel.asm["ttgir"], kernel.asm["ptx"])
