"""cylsm's kernels compiled for the baseline CPU level (the code is in _kernels.pxi)."""
NAME = "compiled-baseline"

include "_kernels.pxi"
