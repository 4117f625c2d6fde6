"""Plain-PyTorch definitions of every sparkct op: the oracle the kernels are tested against, and a
fallback users can call anywhere PyTorch runs."""
from __future__ import annotations


# ---- fused InfoNCE ----------------------------------------------------------------------------


# ---- sparse masked convolution (packed cell tiles) and SparK's dense-masked oracle -------------
