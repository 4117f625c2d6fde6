"""A mask ratio that hides no cell of the crop's grid (a loss of exactly 0), or leaves none visible, is refused
before any work, naming the grid and the nearest ratio that works."""

from __future__ import annotations

import re

import pytest

from sparkct.cli import main
from sparkct.errors import UserError
from sparkct.models.masking import cell_mask, check_mask_grid


@pytest.mark.parametrize(
    "cells, ratio, match",
    [
        (4, 0.0, r"hides no cell .*2x2 = 4 cell.*smallest ratio that hides one cell is 0.126"),
        (4, 0.1, r"hides no cell .*2x2 = 4 cell.*smallest ratio that hides one cell is 0.126"),
        (4, 0.9, r"leaves no cell visible .*2x2 = 4 cell.*largest ratio that leaves one visible is 0.874"),
        (49, 0.005, r"7x7 = 49 cell.*is 0.011"),
        (1, 0.6, r"1x1 = 1 cell.*at least 2 cells.*--crop 64"),
    ],
)
def test_a_ratio_that_masks_nothing_or_everything_is_refused(cells, ratio, match):
    with pytest.raises(UserError, match=match) as e:
        check_mask_grid(cells, ratio, crop=None)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cells", [2, 4, 9, 49])
def test_the_named_ratios_work_and_their_neighbours_do_not(cells):
    for ratio, bad in ((0.0, True), (0.6, False)):
        if bad:
            with pytest.raises(UserError):
                check_mask_grid(cells, ratio)
        else:
            check_mask_grid(cells, ratio)
    try:
        check_mask_grid(cells, 0.0)
    except UserError as e:
        lo = float(str(e).rsplit(" ", 1)[1])
    m = cell_mask(3, (1, cells), lo)
    assert (m.sum(dim=(1, 2)) == cells - 1).all()  # the smallest named ratio hides exactly one cell
    with pytest.raises(UserError):
        check_mask_grid(cells, lo - 0.001)


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--mask-ratio", "0.1", "--crop", "64"], r"--mask-ratio 0.1 hides no cell .*at --crop 64 has 2x2 = 4"),
        (["--mask-ratio", "0", "--crop", "64"], r"--mask-ratio 0 hides no cell"),
        (["--mask-ratio", "0.9", "--crop", "64"], r"leaves no cell visible"),
        (["--crop", "32"], r"at --crop 32 has 1x1 = 1 cell"),
    ],
)
def test_pretrain_refuses_it_before_writing(flags, match, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "spark", "--out", str(out), "--device", "cpu", "--max-steps", "1", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the built-in data's note: the error, one line
    assert err.startswith("sparkct pretrain spark: error:") and re.search(match, err), err
    assert not tmp_path.joinpath("data").exists() and not out.exists()  # no data synthesized, no run folder
