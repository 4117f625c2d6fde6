"""Modules users import."""

# ---- fused InfoNCE ----
from sparkct.nn.info_nce import InfoNCELoss  # noqa: E402,F401

# ---- sparse masked convolution ----
from sparkct.nn.sparse_encoder import SparseEncoder, sparsify  # noqa: E402,F401

# ---- contrastive and clustering pretraining parts ----
from sparkct.nn.heads import (BYOLPredictionHead, BYOLProjectionHead, MoCoProjectionHead,  # noqa: E402,F401
                              ProjectionHead, SimCLRProjectionHead, SwAVProjectionHead, SwAVPrototypes,
                              scaled_width)
from sparkct.nn.ema import MomentumEncoder, cosine_schedule, momentum_copy, update_momentum  # noqa: E402,F401
from sparkct.nn.queue import FeatureQueue  # noqa: E402,F401
from sparkct.nn.swav import SwAVLoss, sinkhorn  # noqa: E402,F401
from sparkct.nn.byol import BYOLLoss, NegativeCosineSimilarity  # noqa: E402,F401
from sparkct.nn.gradcache import chunked, grad_cache  # noqa: E402,F401
