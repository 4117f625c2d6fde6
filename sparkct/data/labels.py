"""Labels on the training slices: :func:`label_slices` maps a labels CSV (or rows) onto a dataset of
the slice cache, for the hybrid objective and the trainer's online probe (data work: it knows no model).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sparkct.data.datasets import CTLabelledDataset
from sparkct.errors import UserError

__all__ = ["label_slices"]


def label_slices(dataset, labels, *, label_column: str = "label", classes: Sequence | None = None):
    """(a copy of `dataset` with ``targets``: class index of each labelled slice, -1 elsewhere; the
    class names). `labels`: a CSV path or rows, as :class:`sparkct.data.CTLabelledDataset` reads them."""
    try:
        lab = CTLabelledDataset(
            dataset.cache,
            labels,
            label_column=label_column,
            classes=classes,
            missing="drop",
            indices=dataset.indices,
            windows=None,
        )
    except (ValueError, OSError) as e:
        raise UserError(f"labels {labels if isinstance(labels, str) else ''}: {e}") from None
    if len(lab.indices) == 0:
        raise UserError("the labels file matches no slice of the training data")
    out = dataset.subset(np.arange(len(dataset)))
    targets = np.full(len(dataset), -1, dtype=np.int64)
    pos = {int(c): i for i, c in enumerate(dataset.indices.tolist())}
    for c, t in zip(lab.indices.tolist(), lab.targets.tolist()):
        targets[pos[int(c)]] = t
    out.targets = targets
    return out, list(lab.classes)
