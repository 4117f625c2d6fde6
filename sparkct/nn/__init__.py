"""Modules users import.

The fused InfoNCE loss (info_nce), DINO's fused prototype cross-entropy (prototype_ce), the sparse
masked convolution encoder (sparse_encoder), and the contrastive, clustering and self-distillation
pretraining parts (byol, dino, ema, gradcache, heads, queue, swav).
"""

from sparkct.nn.byol import BYOLLoss, NegativeCosineSimilarity  # noqa: F401
from sparkct.nn.dino import (  # noqa: F401
    DINOHead,
    center_update,
    ibot_patch_loss,
    koleo_loss,
    prototype_cross_entropy,
    sinkhorn_bias,
    teacher_momentum,
    teacher_temperature,
)
from sparkct.nn.ema import MomentumEncoder, cosine_schedule, momentum_copy, update_momentum  # noqa: F401
from sparkct.nn.gradcache import chunked, grad_cache  # noqa: F401
from sparkct.nn.heads import (  # noqa: F401
    BYOLPredictionHead,
    BYOLProjectionHead,
    MoCoProjectionHead,
    ProjectionHead,
    SimCLRProjectionHead,
    SwAVProjectionHead,
    SwAVPrototypes,
    scaled_width,
)
from sparkct.nn.info_nce import InfoNCELoss  # noqa: F401
from sparkct.nn.prototype_ce import PrototypeCrossEntropyLoss  # noqa: F401
from sparkct.nn.queue import FeatureQueue  # noqa: F401
from sparkct.nn.sparse_encoder import SparseEncoder, sparsify  # noqa: F401
from sparkct.nn.swav import SwAVLoss, sinkhorn  # noqa: F401
