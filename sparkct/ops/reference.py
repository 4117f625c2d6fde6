"""Plain-PyTorch definitions of every sparkct op: the oracle the kernels are tested against, and a
fallback users can call anywhere PyTorch runs."""
from __future__ import annotations


# ---- fused InfoNCE ----------------------------------------------------------------------------

def info_nce(z0, z1, temperature: float = 0.5, bank=None, *, cols=None, col_offset: int = 0):
    """InfoNCE the naive way: normalize, form every logit, cross-entropy (sparkct.ops.info_nce's
    semantics; computed in the inputs' dtype).

    No bank: anchors [z0; z1] (2N); anchor r's positive is its other view, its own column is
    excluded. `cols` (M, D) replaces the columns by gathered embeddings in which the anchors sit at
    rows [col_offset, col_offset + 2N) (the distributed case; cols=None means cols = [z0; z1]).
    Bank (K, D): anchors z0, positive z1 row-wise, negatives the (normalized) bank rows.
    """
    import torch
    import torch.nn.functional as F

    if bank is not None:
        q = F.normalize(z0, dim=1)
        pos = (q * F.normalize(z1, dim=1)).sum(1, keepdim=True)
        logits = torch.cat([pos, q @ F.normalize(bank, dim=1).t()], 1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
    n = z0.shape[0]
    rows = F.normalize(torch.cat([z0, z1], 0), dim=1)
    c = rows if cols is None else F.normalize(cols, dim=1)
    logits = rows @ c.t() / temperature
    r = torch.arange(2 * n, device=rows.device)
    logits = logits.index_put((r, r + col_offset), torch.tensor(float("-inf"), dtype=logits.dtype,
                                                                 device=logits.device))
    labels = col_offset + torch.where(r < n, r + n, r - n)
    return F.cross_entropy(logits, labels)



# ---- sparse masked convolution (packed cell tiles) and SparK's dense-masked oracle -------------
