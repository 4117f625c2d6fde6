"""preview() of the contrastive / clustering methods: the views side by side (SwAV's local crop enlarged)
and the nearest neighbours by backbone features, against a plain computation; the PNG sheet made of them
(the trainer's run folder has one for every method: tests/train/test_resume_contrastive.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparkct.models import get_method

from contrastive_helpers import FEATURES, synthetic_hu, tiny_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"simclr": {}, "moco": dict(queue_size=32), "byol": {}, "swav": dict(prototypes=10, n_local=2, local_crop=16)}


def make(name):
    torch.manual_seed(0)
    cls = get_method(name)
    return cls(
        tiny_backbone(), cls.config_class(proj_hidden_dim=32, proj_dim=8, **SMALL[name]), feature_dim=FEATURES
    ).eval()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_preview_rows(name):
    m = make(name)
    views = m.transform(32, "lung")(synthetic_hu(12), torch.Generator().manual_seed(0))
    rows = m.preview(views)
    names = list(rows)
    assert names[:2] == ["view 1", "view 2"]
    assert torch.equal(rows["view 1"], views[0][:8]) and torch.equal(rows["view 2"], views[1][:8])
    if name == "swav":
        assert names[2] == "local crop (16 px)"
        assert torch.equal(rows[names[2]], F.interpolate(views[2][:8], size=(32, 32), mode="nearest"))
    for v in rows.values():
        assert v.shape == (8, 1, 32, 32) and 0 <= float(v.min()) and float(v.max()) <= 1
    # the nearest neighbours, computed plainly over the whole batch of 12
    with torch.no_grad():
        a = F.normalize(m.backbone(views[0]), dim=1)
        b = F.normalize(m.backbone(views[1]), dim=1)
    nn_view2 = torch.tensor([max(range(12), key=lambda j: float(a[i] @ b[j])) for i in range(12)])
    own = int((nn_view2 == torch.arange(12)).sum())
    assert names[-2] == f"nearest view 2 ({own}/12 own, chance 1/12)"
    assert torch.equal(rows[names[-2]], views[1][nn_view2[:8]])
    nn_other = [max((j for j in range(12) if j != i), key=lambda j: float(a[i] @ a[j])) for i in range(8)]
    assert names[-1] == "nearest other slice" and torch.equal(rows[names[-1]], views[0][nn_other])


def test_preview_counts_own_views_and_takes_labelled_batches():
    m = make("simclr")
    views = m.transform(32, "lung")(synthetic_hu(6), torch.Generator().manual_seed(1))
    rows = m.preview(([views[0], views[0].clone()], torch.zeros(6, dtype=torch.long)))  # (views, targets)
    assert "nearest view 2 (6/6 own, chance 1/6)" in rows  # identical views: every slice finds its own
    assert len(rows["view 1"]) == 6


def test_preview_png(tmp_path):
    from sparkct.train.visual import save_preview

    m = make("swav")
    views = m.transform(32, "lung")(synthetic_hu(8), torch.Generator().manual_seed(2))
    save_preview(m.preview(views), str(tmp_path / "p.png"), title="swav")
    from PIL import Image

    im = Image.open(tmp_path / "p.png")
    assert im.size[1] >= 5 * 32  # 5 rows: 2 views, a local crop, 2 neighbour rows
