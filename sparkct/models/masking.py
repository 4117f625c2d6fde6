"""The one SparK cell-mask generator (tests, benchmarks, models and the trainer all draw masks here).

SparK masks on the coarsest grid (one cell = 32 x 32 input pixels): every sample keeps exactly
``round(cells * (1 - ratio))`` visible cells (at least one) at independent random places, as SparK's
``mask()`` does (a random permutation per sample, the first ``keep`` cells visible).
"""

from __future__ import annotations

import math

import torch

from sparkct.errors import UserError

__all__ = ["visible_cells", "cell_mask", "check_mask_ratio", "check_mask_grid", "CELL"]

CELL = 32  # input pixels per mask cell (the encoder's total stride)


def check_mask_ratio(ratio: float) -> float:
    r = float(ratio)
    if not math.isfinite(r) or not 0.0 <= r < 1.0:
        raise UserError(f"mask ratio must be in [0, 1) (the fraction of cells hidden), got {ratio}")
    return r


def _hidden(cells: int, ratio: float) -> int:
    return cells - round(cells * (1.0 - ratio))


def check_mask_grid(cells: int, ratio: float, *, crop: int | None = None, flag: str = "--mask-ratio") -> float:
    """`ratio` if it hides at least one of `cells` cells and leaves at least one visible; else a
    UserError naming the grid and the nearest ratio that works (to 3 decimals). A mask that hides nothing
    trains with a loss of exactly 0; ``visible_cells`` would silently keep one cell of a mask that hides
    everything. `crop`, `flag`: how the user named them, for the message."""
    r = check_mask_ratio(ratio)
    side = math.isqrt(cells)
    grid = f"{side}x{side} = {cells}" if side * side == cells else f"{cells}"
    at = f" at --crop {crop}" if crop is not None else ""
    where = f"the mask grid{at} has {grid} cell(s) of {CELL}x{CELL} pixels"
    if cells < 2:
        raise UserError(
            f"{where}: masking needs at least 2 cells (one hidden, one visible); use --crop {2 * CELL} or more"
        )
    if _hidden(cells, r) < 1:
        lo = next(k / 1000 for k in range(1, 1000) if _hidden(cells, k / 1000) >= 1)
        raise UserError(
            f"{flag} {ratio:g} hides no cell ({where}, {cells} x {1 - r:g} rounds to {cells} visible), so the "
            f"loss would be 0; the smallest ratio that hides one cell is {lo:g}"
        )
    if _hidden(cells, r) >= cells:
        hi = next(k / 1000 for k in range(999, 0, -1) if _hidden(cells, k / 1000) < cells)
        raise UserError(
            f"{flag} {ratio:g} leaves no cell visible ({where}, {cells} x {1 - r:g} rounds to 0 visible); the largest "
            f"ratio that leaves one visible is {hi:g}"
        )
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
