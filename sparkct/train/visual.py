"""What a person looks at during training: the preview grid and the loss curve (written atomically)."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from sparkct import io as sio

__all__ = ["save_preview", "plot_curves", "curves_figure", "epoch_rows"]


def save_preview(rows: dict, path: str, title: str = "", n: int = 8, channel: int = 0) -> None:
    """rows: name -> (B, C, H, W) tensor in [0, 1]. One labelled row per entry, up to n samples, the given
    channel (the first HU window by default) in greyscale."""
    arrays = {}
    for name, t in rows.items():
        a = t.detach().float().cpu().clamp(0, 1).numpy()
        c = min(channel, a.shape[1] - 1)
        arrays[name] = (a[:n, c] * 255).round().astype(np.uint8)
    if not arrays:
        return
    h, w = next(iter(arrays.values())).shape[1:]
    k = min(len(a) for a in arrays.values())
    label_w, top, pad = 150, 24 if title else 4, 2
    sheet = Image.new("L", (label_w + k * (w + pad), top + len(arrays) * (h + pad)), color=32)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 4), title, fill=255)
    for r, (name, a) in enumerate(arrays.items()):
        y = top + r * (h + pad)
        draw.text((4, y + h // 2 - 6), name, fill=255)
        for i in range(k):
            sheet.paste(Image.fromarray(a[i]), (label_w + i * (w + pad), y))
    with sio.atomic_path(path, ".png") as tmp:
        sheet.save(tmp, format="PNG")


def plot_curves(
    metrics_csv: str,
    path: str,
    keys=("loss",),
    title: str = "",
    *,
    reference: float | None = None,
    marks=(),
) -> bool:
    """Plot columns of metrics.csv against the step; False if there is nothing to plot. `reference`: the
    loss of uninformative predictions (a line on the loss panel); `marks`: (step, label) vertical lines
    (schedule events). The epoch rows of metrics.jsonl beside it add a validation AUC panel with the
    best epoch (the checkpoint best.ckpt holds) marked."""
    if not os.path.isfile(metrics_csv):
        return False
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return False
    import matplotlib  # noqa: PLC0415 (lazy: optional dependency)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (lazy: optional dependency)

    epochs = epoch_rows(os.path.join(os.path.dirname(metrics_csv), "metrics.jsonl"))
    fig = curves_figure(rows, epochs, keys, title, reference=reference, marks=marks)
    with sio.atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def epoch_rows(jsonl: str) -> list[dict]:
    """The epoch rows (keys ``epoch/...``) of a metrics.jsonl, in order; [] without the file."""
    if not os.path.isfile(jsonl):
        return []
    out = []
    with open(jsonl) as f:
        for ln in f:
            if ln.strip():
                r = json.loads(ln)
                if any(k.startswith("epoch/") for k in r):
                    out.append(r)
    return out


def curves_figure(rows: list[dict], epochs: list[dict], keys, title: str = "", *, reference=None, marks=()):
    """The figure of loss.png (see plot_curves): one panel per metrics column in `keys`, then validation
    AUC at each validation when `epochs` (metrics.jsonl epoch rows) hold ``epoch/val_auc``."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 (lazy: optional dependency)

    keys = [k for k in keys if k in rows[0]]
    val = [(int(r["step"]), float(r["epoch/val_auc"])) for r in epochs if "epoch/val_auc" in r]
    n = len(keys) + bool(val)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4.2), squeeze=False)
    steps = [int(r["step"]) for r in rows]
    for ax, key in zip(axes[0], keys):
        vals = [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows]
        ax.plot(steps, vals, marker=".", lw=1, label=key)
        if key == "loss" and reference is not None:
            ax.axhline(
                reference, color="grey", ls=":", lw=1.2, label=f"uninformative (uniform) predictions: {reference:.3f}"
            )
        ax.set_ylabel(key)
    if val:
        ax = axes[0][-1]
        vs, va = zip(*val)
        ax.plot(vs, va, marker="o", ms=4, lw=1, color="C2", label="validation AUC")
        mon = [(float(r["epoch/monitor"]), int(r["step"])) for r in epochs if "epoch/monitor" in r]
        # best.ckpt is the first epoch with the highest monitor (a later tie does not replace it)
        best_step = max(mon, key=lambda m: (m[0], -m[1]))[1] if mon else vs[int(np.argmax(va))]
        best_auc = dict(val).get(best_step)
        if best_auc is not None:
            ax.plot(
                [best_step],
                [best_auc],
                marker="*",
                ms=14,
                color="C3",
                ls="",
                label=f"tested checkpoint (step {best_step})",
            )
        ax.axhline(0.5, color="grey", ls=":", lw=1, label="chance (AUC 0.5)")
        ax.set_ylabel("validation AUC")
    for ax in axes[0]:
        for j, (step, label) in enumerate(marks):
            ax.axvline(step, color=f"C{4 + j}", ls="--", lw=1, label=f"{label} (step {step})")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        # below the axes: inside, a legend hides the few points of a short run
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig
