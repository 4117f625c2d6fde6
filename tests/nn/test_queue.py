"""FeatureQueue: FIFO order across wrap-around, partial fill, a push larger than the queue, resume."""

from __future__ import annotations

import pytest
import torch

from sparkct.nn import FeatureQueue


def rows(a, b):
    return torch.arange(a, b, dtype=torch.float32)[:, None].repeat(1, 2)


def test_fifo_order_with_wraparound():
    q = FeatureQueue(5, 2)
    assert len(q) == 0 and not q.full and q.features().shape == (0, 2)
    q.push(rows(0, 3))
    torch.testing.assert_close(q.features(), rows(0, 3))
    q.push(rows(3, 5))
    assert q.full
    torch.testing.assert_close(q.features(), rows(0, 5))
    q.push(rows(5, 8))  # wraps: the three oldest go
    torch.testing.assert_close(q.features(), rows(3, 8))
    for i in range(8, 20):  # one at a time
        q.push(rows(i, i + 1))
        torch.testing.assert_close(q.features(), rows(i - 4, i + 1))


def test_push_larger_than_queue_keeps_newest():
    q = FeatureQueue(4, 2)
    q.push(rows(0, 1))
    q.push(rows(1, 11))
    torch.testing.assert_close(q.features(), rows(7, 11))


def test_state_dict_roundtrip_and_bad_rows():
    q = FeatureQueue(4, 2)
    q.push(rows(0, 6))
    r = FeatureQueue(4, 2)
    r.load_state_dict(q.state_dict())
    r.push(rows(6, 7))
    torch.testing.assert_close(r.features(), rows(3, 7))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        q.push(torch.zeros(3, 5))
    with pytest.raises(ValueError):
        FeatureQueue(0, 2)
