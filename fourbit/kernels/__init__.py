"""GPU kernels (Triton/Gluon), one op per file, and their torch twins in ref.py."""
