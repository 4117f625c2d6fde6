"""What a person looks at during training: the preview grid and the loss curve (written atomically)."""

from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image, ImageDraw

from sparkct import io as sio

__all__ = ["save_preview", "plot_curves"]


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


def plot_curves(metrics_csv: str, path: str, keys=("loss",), title: str = "") -> bool:
    """Plot columns of metrics.csv against the step; False if there is nothing to plot."""
    if not os.path.isfile(metrics_csv):
        return False
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return False
    import matplotlib  # noqa: PLC0415 (lazy: optional dependency)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (lazy: optional dependency)

    keys = [k for k in keys if k in rows[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    steps = [int(r["step"]) for r in rows]
    for ax, key in zip(axes[0], keys):
        vals = [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows]
        ax.plot(steps, vals, marker=".", lw=1)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    with sio.atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True
