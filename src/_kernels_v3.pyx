"""cylsm's kernels compiled for the v3 CPU level (the code is in _kernels.pxi)."""
NAME = "compiled-v3"

include "_kernels.pxi"
