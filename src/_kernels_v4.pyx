"""cylsm's kernels compiled for the v4 CPU level (the code is in _kernels.pxi)."""
NAME = "compiled-v4"

include "_kernels.pxi"
