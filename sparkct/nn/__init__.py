"""Modules users import."""

# ---- fused InfoNCE ----
from sparkct.nn.info_nce import InfoNCELoss  # noqa: E402,F401

# ---- sparse masked convolution ----
from sparkct.nn.sparse_encoder import SparseEncoder, sparsify  # noqa: E402,F401
