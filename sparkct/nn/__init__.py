"""Modules users import."""

# ---- fused InfoNCE ----

# ---- sparse masked convolution ----
