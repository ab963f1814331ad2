"""W4A16 GEMM benchmark (same as `fourbit bench gemm`): python benchmarks/bench_gemm.py [--m 1 16 ...]."""
from fourbit.cli import main

if __name__ == "__main__":
    import sys

    main(["bench", "gemm", *sys.argv[1:]])
