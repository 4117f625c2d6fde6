"""Modules users import."""

# ---- fused InfoNCE ----
from sparkct.nn.info_nce import InfoNCELoss  # noqa: E402,F401

# ---- sparse masked convolution ----
