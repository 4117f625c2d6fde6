"""Modules users import."""

# ---- fused InfoNCE ----

# ---- sparse masked convolution ----
from sparkct.nn.sparse_encoder import SparseEncoder, sparsify  # noqa: E402,F401
