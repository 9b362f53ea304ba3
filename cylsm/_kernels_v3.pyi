# The same kernels as _kernels_baseline, compiled for another CPU level.
from cylsm._kernels_baseline import *
