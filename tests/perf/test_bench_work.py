"""The FLOP and byte counts the kernel benchmarks record (the roofline's inputs), on hand-worked cases."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
)
bench_info_nce = pytest.importorskip("bench_info_nce")
bench_sparse_encoder = pytest.importorskip("bench_sparse_encoder")


def test_info_nce_compulsory_bytes():
    # 2N=4 rows of D=3 fp32: read 48 B, write 4 fp32 LSEs; backward reads both again, writes 48 B
    assert bench_info_nce.compulsory_bytes(4, 3, 4, backward=False) == 48 + 16
    assert bench_info_nce.compulsory_bytes(4, 3, 4, backward=True) == 48 + 16 + 96 + 16


def test_conv3x3_work():
    # 10 output pixels, 2 -> 2 channels, fp32: 9 * 2 * 2 multiply-adds per pixel
    fwd = bench_sparse_encoder.conv3x3_work(10, 2, 4, backward=False)
    assert fwd == {"flops": 720, "bytes_moved": 2 * 80 + 144}
    both = bench_sparse_encoder.conv3x3_work(10, 2, 4, backward=True)
    assert both == {"flops": 3 * 720, "bytes_moved": 5 * 80 + 3 * 144}


def test_encoder_flops_scale_with_batch_and_visible_cells():
    dense1 = bench_sparse_encoder.dense_encoder_flops("resnet18", 1, 64)
    assert bench_sparse_encoder.dense_encoder_flops("resnet18", 2, 64) == 2 * dense1
    # resnet18's convolutions: 1.82 GMAC per 224x224 image forward, so about 0.30 GFLOP at 64x64
    # (a 12.25x smaller map); forward + backward is a little under 3x (no input gradient for x)
    assert 2.5 * 0.29e9 < dense1 < 3 * 0.31e9
    assert bench_sparse_encoder.encoder_flops("spark", "resnet18", 1, 64, 0.5) == dense1
    assert bench_sparse_encoder.encoder_flops("sparse", "resnet18", 1, 64, 0.5) == round(dense1 * 0.5)
