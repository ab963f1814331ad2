"""End-to-end serving benchmark (same as `fourbit bench e2e`): python benchmarks/bench_e2e.py [--sweep] ..."""
from fourbit.cli import main

if __name__ == "__main__":
    import sys

    main(["bench", "e2e", *sys.argv[1:]])
