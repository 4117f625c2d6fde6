"""sparkct.eval.convergence on hand-made validation histories: the steps to reach 95 % of random init's best
validation AUC (reached, reached by some seeds, never reached, no random run), the saving, and the figure."""

from __future__ import annotations

import numpy as np
import pytest

from sparkct.eval.convergence import best_val_auc, convergence, convergence_figure, steps_to_reach


def _hist(aucs, every=10):
    return [{"epoch": i + 1, "step": every * (i + 1), "val_auc": v} for i, v in enumerate(aucs)]


def _run(method, fraction, seed, aucs, status="done"):
    return {"method": method, "fraction": fraction, "seed": seed, "status": status, "val_history": _hist(aucs)}


RUNS = [
    # random's best is 0.85 for both seeds: the target is 0.95 x 0.85 = 0.8075
    _run("random", 1.0, 0, [0.6, 0.7, 0.81, 0.85, 0.84]),  # first at or above it: step 30
    _run("random", 1.0, 1, [0.55, 0.65, 0.75, 0.82, 0.85]),  # step 40
    _run("spark", 1.0, 0, [0.82, 0.86, 0.9, 0.9, 0.9]),  # step 10
    _run("spark", 1.0, 1, [0.7, 0.81, 0.88, 0.9, 0.9]),  # step 20
    _run("simclr", 1.0, 0, [0.6, 0.7, 0.8, 0.8, 0.79]),  # never
    _run("simclr", 1.0, 1, [0.6, 0.7, 0.8, 0.8, 0.8]),
    _run("moco", 1.0, 0, [0.7, 0.9, 0.9, 0.9, 0.9]),  # step 20
    _run("moco", 1.0, 1, [0.5, 0.6, 0.7, 0.75, 0.8]),  # never
    _run("moco", 1.0, 2, [], status="failed"),  # a failed run counts for nothing
    _run("spark", 0.5, 0, [0.7, 0.8]),  # no random run at 50 %: no target
]


def test_steps_to_reach_and_best_skip_missing_aucs():
    h = _hist([None, 0.7, float("nan"), 0.9, 0.8])
    assert steps_to_reach(h, 0.7) == 20  # at or above: equal counts
    assert steps_to_reach(h, 0.85) == 40 and steps_to_reach(h, 0.95) is None
    assert best_val_auc(h) == 0.9 and best_val_auc([]) is None
    assert steps_to_reach(list(reversed(h)), 0.75) == 40  # by step, not by row order


def test_convergence_reached_not_reached_partial_and_random_itself():
    conv = convergence(RUNS)
    assert conv["baseline"] == "random" and conv["share"] == 0.95
    rows = {(r["method"], r["fraction"]): r for r in conv["rows"]}
    assert [(r["method"], r["fraction"]) for r in conv["rows"]][0] == ("random", 1.0)  # the baseline first
    rnd = rows[("random", 1.0)]
    assert rnd["target"] == pytest.approx(0.95 * 0.85)
    assert rnd["steps_per_seed"] == [30, 40] and rnd["steps"] == 35 and rnd["saving"] == 0
    spark = rows[("spark", 1.0)]
    assert spark["steps_per_seed"] == [10, 20] and spark["steps"] == 15
    assert spark["saving"] == pytest.approx(1 - 15 / 35) and spark["seeds_reached"] == 2
    simclr = rows[("simclr", 1.0)]
    assert simclr["steps"] is None and simclr["saving"] is None and simclr["seeds_reached"] == 0
    moco = rows[("moco", 1.0)]  # one seed of two reached it: the mean over that one, and how many said
    assert moco["seeds"] == [0, 1] and moco["steps_per_seed"] == [20, None]
    assert moco["steps"] == 20 and moco["seeds_reached"] == 1 and moco["saving"] == pytest.approx(1 - 20 / 35)
    half = rows[("spark", 0.5)]
    assert half["target"] is None and half["steps"] is None and half["saving"] is None
    # another share and another baseline
    strict = {(r["method"], r["fraction"]): r for r in convergence(RUNS, share=1.0)["rows"]}
    assert strict[("random", 1.0)]["steps_per_seed"] == [40, 50] and strict[("spark", 1.0)]["steps"] == 25
    by_spark = {(r["method"], r["fraction"]): r for r in convergence(RUNS, baseline="spark")["rows"]}
    assert by_spark[("spark", 0.5)]["target"] == pytest.approx(0.95 * 0.8)
    assert by_spark[("random", 1.0)]["target"] == pytest.approx(0.95 * 0.9)


def test_convergence_figure_one_panel_per_fraction_mean_and_seed_lines(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conv = convergence(RUNS)
    fig = convergence_figure(RUNS, conv, "t", "data: x")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["100 % of the labelled patients", "50 % of the labelled patients"]
    full = axes[0]
    ys = [list(ln.get_ydata()) for ln in full.lines]
    assert [0.5, 0.5] in ys  # chance
    assert [pytest.approx(conv["rows"][0]["target"])] * 2 in ys  # the table's target
    # spark at 100 %: its two seeds and their mean
    mean = [np.mean(v) for v in zip([0.82, 0.86, 0.9, 0.9, 0.9], [0.7, 0.81, 0.88, 0.9, 0.9])]
    assert any(np.allclose(y, mean) for y in ys if len(y) == 5)
    labels = full.get_legend_handles_labels()[1]
    assert {"random (baseline)", "spark", "simclr", "moco", "chance (AUC 0.5)"} <= set(labels)
    fig.canvas.draw()
    leg = axes[-1].get_legend().get_window_extent()
    assert leg.x0 >= axes[-1].get_window_extent().x1  # outside the panels
    assert "data: x" in " ".join(t.get_text() for t in fig.texts)
    plt.close(fig)
