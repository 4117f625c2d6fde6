"""The kernels: Python face of every op in ``torch.ops.sparkct``.

Each op module validates its input, attaches autograd and fake kernels, and exposes a function.
``sparkct.ops.reference`` holds the plain-PyTorch semantics every kernel is tested against.
"""

from sparkct._ext import build_info, cuda_version, with_cuda

__all__ = ["build_info", "cuda_version", "with_cuda"]

# ---- fused InfoNCE ----
from sparkct.ops.info_nce import info_nce

__all__ += ["info_nce"]

# ---- fused prototype cross-entropy (DINO) ----
from sparkct.ops.prototype_ce import prototype_cross_entropy, prototype_sinkhorn  # noqa: E402

__all__ += ["prototype_cross_entropy", "prototype_sinkhorn"]

# ---- sparse masked convolution ----
from sparkct.ops import sparse  # noqa: E402
from sparkct.ops.sparse import (  # noqa: E402
    CellLayout,
    cell_layout,
    halo,
    im2col,
    pack,
    sparse_conv2d,
    sparse_max_pool2d,
    unpack,
)

__all__ += [
    "sparse",
    "CellLayout",
    "cell_layout",
    "pack",
    "unpack",
    "halo",
    "im2col",
    "sparse_conv2d",
    "sparse_max_pool2d",
]
