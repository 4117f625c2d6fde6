"""How fast fine-tuning converges, from each run's validation history (``result.json`` "val_history": rows
of step and val_auc, every ``--eval-every`` steps): the optimizer steps each method needs to reach a share
(95 %) of random init's best validation AUC at the same labelled fraction, and the saving against random
init's own steps, the measure behind published claims of "up to 85 % fewer steps".

- :func:`convergence`: the numbers (a pure function of the runs; ``results.json``, the Convergence table of
  ``results.md``);
- :func:`convergence_figure`: ``convergence.png``, validation AUC against the step, one panel per fraction,
  one line per method (the mean over seeds, each seed a thin line).

The target at a fraction is ``share`` x the mean over random init's seeds of each seed's best validation
AUC. A method's steps are the mean, over the seeds that reach the target, of the first validated step at or
above it (a validation every N steps: a step count is known to within N); how many seeds reached it is
given beside, and a method no seed of which reaches it has "not reached". Only fine-tuning runs count: the
linear probes are not part of this measure.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from sparkct.eval.figures import panel_legend, place_caption

__all__ = ["SHARE", "steps_to_reach", "best_val_auc", "convergence", "convergence_figure"]

#: the share of random init's best validation AUC a method has to reach
SHARE = 0.95


def _points(history: list[dict]) -> list[tuple[int, float]]:
    """(step, val_auc) of the validations that gave an AUC, by step."""
    pts = []
    for row in history or []:
        v = row.get("val_auc")
        if v is not None and math.isfinite(float(v)):
            pts.append((int(row["step"]), float(v)))
    return sorted(pts)


def steps_to_reach(history: list[dict], target: float) -> int | None:
    """The first validated step whose AUC is at least `target`, or None where none is."""
    return next((s for s, v in _points(history) if v >= target), None)


def best_val_auc(history: list[dict]) -> float | None:
    pts = _points(history)
    return max(v for _, v in pts) if pts else None


def _histories(runs: list[dict]) -> dict[tuple[str, float], list[tuple[int, list[dict]]]]:
    """(method, fraction) -> [(seed, val_history)] of the finished runs with a validation history."""
    out: dict = defaultdict(list)
    for r in runs:
        if r.get("status", "done") == "done" and _points(r.get("val_history")):
            out[(r.get("method", "?"), float(r["fraction"]))].append((r.get("seed"), r["val_history"]))
    for v in out.values():
        v.sort(key=lambda sh: str(sh[0]))
    return out


def convergence(runs: list[dict], *, baseline: str = "random", share: float = SHARE) -> dict:
    """Per method and fraction: the target (`share` x `baseline`'s mean best validation AUC at that
    fraction), the steps to reach it per seed and their mean over the seeds that did, and the saving
    against `baseline` (1 - steps / baseline's steps; None where either has no steps). `runs`: fine-tuning
    runs as result.json holds them (method, fraction, seed, status, val_history)."""
    hist = _histories(runs)
    targets = {}
    for (m, f), hs in hist.items():
        if m == baseline:
            targets[f] = share * float(np.mean([best_val_auc(h) for _, h in hs]))
    rows = []
    for (m, f), hs in sorted(hist.items(), key=lambda kv: (kv[0][0] != baseline, kv[0][0], -kv[0][1])):
        target = targets.get(f)
        per_seed = [steps_to_reach(h, target) if target is not None else None for _, h in hs]
        reached = [s for s in per_seed if s is not None]
        rows.append(
            {
                "method": m,
                "fraction": f,
                "target": target,
                "seeds": [s for s, _ in hs],
                "steps_per_seed": per_seed,
                "best_val_auc_per_seed": [best_val_auc(h) for _, h in hs],
                "seeds_reached": len(reached),
                "steps": float(np.mean(reached)) if reached else None,
            }
        )
    base_steps = {r["fraction"]: r["steps"] for r in rows if r["method"] == baseline}
    for r in rows:
        b = base_steps.get(r["fraction"])
        r["saving"] = 1 - r["steps"] / b if r["steps"] is not None and b else None
    return {"baseline": baseline, "share": share, "rows": rows}


def _mean_curve(hs: list[tuple[int, list[dict]]]) -> tuple[np.ndarray, np.ndarray]:
    """The seeds' mean validation AUC on the steps any of them validated at, where all have begun and
    none has ended (runs of one fraction validate at nearly the same steps; the seeds' epochs may differ)."""
    curves = [np.array(_points(h), dtype=float) for _, h in hs]
    lo, hi = max(c[0, 0] for c in curves), min(c[-1, 0] for c in curves)
    grid = np.unique(np.concatenate([c[:, 0] for c in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    return grid, np.mean([np.interp(grid, c[:, 0], c[:, 1]) for c in curves], axis=0)


def convergence_figure(runs: list[dict], conv: dict, title: str, caption: str = ""):
    """The figure of convergence.png: one panel per fraction (the largest first), validation AUC against
    the fine-tuning step, per method the mean over seeds (thin lines: each seed), colours as in
    auc_vs_fraction.png; the target of the Convergence table dashed, chance (0.5) dotted; the legend
    outside the panels, `caption` under them."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 (lazy: optional dependency)

    hist = _histories(runs)
    base = conv["baseline"]
    methods = sorted({m for m, _ in hist}, key=lambda m: (m != base, m))
    fracs = sorted({f for _, f in hist}, reverse=True)
    targets = {r["fraction"]: r["target"] for r in conv["rows"]}
    fig, axes = plt.subplots(1, len(fracs), figsize=(1.6 + 3.0 * len(fracs), 3.8), dpi=120, sharey=True, squeeze=False)
    for ax, f in zip(axes[0], fracs):
        for i, m in enumerate(methods):
            hs = hist.get((m, f))
            if not hs:
                continue
            color = "black" if m == base else f"C{i}"
            if len(hs) > 1:
                for _, h in hs:
                    pts = np.array(_points(h), dtype=float)
                    ax.plot(pts[:, 0], pts[:, 1], color=color, lw=0.7, alpha=0.3)
            x, y = _mean_curve(hs)
            ax.plot(x, y, color=color, lw=1.6, marker=".", ms=3, label=f"{m} (baseline)" if m == base else m)
        if targets.get(f) is not None:
            ax.axhline(targets[f], color="black", ls="--", lw=0.8, label=f"{100 * conv['share']:g} % of {base}'s best")
        ax.axhline(0.5, color="grey", ls=":", lw=1, label="chance (AUC 0.5)")
        ax.set_title(f"{100 * f:g} % of the labelled patients", fontsize=9)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation AUC")
    fig.suptitle(title, fontsize=9)
    panel_legend(axes[0])
    place_caption(fig, caption, bottom=0.05)
    return fig
