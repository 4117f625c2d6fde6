"""The one SparK cell-mask generator (tests, benchmarks, models and the trainer all draw masks here).

SparK masks on the coarsest grid (one cell = 32 x 32 input pixels): every sample keeps exactly
``round(cells * (1 - ratio))`` visible cells (at least one) at independent random places, as SparK's
``mask()`` does (a random permutation per sample, the first ``keep`` cells visible).
"""

from __future__ import annotations

import math

import torch

from sparkct.errors import UserError

__all__ = ["visible_cells", "cell_mask", "check_mask_ratio", "CELL"]

CELL = 32  # input pixels per mask cell (the encoder's total stride)


def check_mask_ratio(ratio: float) -> float:
    r = float(ratio)
    if not math.isfinite(r) or not 0.0 <= r < 1.0:
        raise UserError(f"mask ratio must be in [0, 1) (the fraction of cells hidden), got {ratio}")
    return r


def visible_cells(cells: int, ratio: float) -> int:
    """Visible cells per sample: round(cells * (1 - ratio)), at least 1."""
    return max(1, min(cells, round(cells * (1.0 - check_mask_ratio(ratio)))))


def cell_mask(
    batch: int,
    grid: int | tuple[int, int],
    ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """(batch, gh, gw) bool, True = visible, exactly ``visible_cells(gh * gw, ratio)`` per sample.

    Drawn on the CPU from `generator` (so a seed gives the same masks on every device), then moved to
    `device`. Samples are independent: each gets its own random ranking of the cells."""
    gh, gw = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if batch < 0 or gh < 1 or gw < 1:
        raise ValueError(f"cell_mask: need batch >= 0 and a grid of at least 1x1, got {batch} x {gh}x{gw}")
    n = gh * gw
    keep = visible_cells(n, ratio)
    # argsort of uniform noise = an independent random permutation per sample, in one batched op
    rank = torch.rand(batch, n, generator=generator).argsort(dim=1).argsort(dim=1)
    return (rank < keep).view(batch, gh, gw).to(device)
