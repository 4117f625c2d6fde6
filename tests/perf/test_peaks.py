"""sparkct.perf.peaks: the GPU datasheet table, the CPU calibration, unknown GPUs."""

from __future__ import annotations

import pytest
import torch

from sparkct.perf import peaks as P


@pytest.mark.parametrize(
    "name,label",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
        ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090"),
        ("Tesla V100-SXM2-16GB", "V100 SXM2"),
        ("Tesla V100-PCIE-32GB", "V100 PCIe"),
        ("Tesla V100S-PCIE-32GB", "V100S PCIe"),
        ("Tesla T4", "T4"),
    ],
)
def test_gpu_table_matches_the_specific_model(name, label):
    pk = P.gpu_table_peaks(name)
    assert pk["source"] == f"table:{label}" and pk["name"] == name
    by = pk["compute_by_dtype_gflop_s"]
    assert pk["compute_gflop_s"] == by["fp32"] > 0 and pk["bandwidth_gb_s"] > 0
    assert all(by[k] >= by["fp32"] for k in by)  # tensor-core rates are never below the fp32 rate
    assert pk["reference"]


def test_gpu_table_figures_are_dense_datasheet_values():
    h100 = P.gpu_table_peaks("NVIDIA H100 80GB HBM3")
    assert h100["compute_by_dtype_gflop_s"] == {"fp32": 67000.0, "tf32": 494700.0, "bf16": 989400.0, "fp16": 989400.0}
    assert h100["bandwidth_gb_s"] == 3350.0
    assert P.gpu_table_peaks("NVIDIA H200")["bandwidth_gb_s"] == 4800.0
    assert P.gpu_table_peaks("NVIDIA A100-SXM4-80GB")["bandwidth_gb_s"] == 2039.0


def test_unknown_gpu_is_said_unknown_and_measured_when_asked(monkeypatch):
    assert P.gpu_table_peaks("NVIDIA Mystery X1") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA Mystery X1")
    pk = P.gpu_peaks("cuda", measure_unknown=False)
    assert pk["source"] == "unknown" and "Mystery X1" in pk["note"] and pk["compute_gflop_s"] is None
    seen = {}

    def fake_calibrate(device, **kw):  # the calibration itself needs the GPU; here: that it is called
        seen["device"] = device
        return {
            "device": "cuda",
            "source": "measured",
            "compute_gflop_s": 1.0,
            "compute_by_dtype_gflop_s": {"fp32": 1.0},
            "bandwidth_gb_s": 2.0,
        }

    monkeypatch.setattr(P, "calibrate", fake_calibrate)
    pk = P.gpu_peaks("cuda")
    assert seen["device"] == "cuda" and pk["source"] == "measured"
    assert "not in sparkct.perf.peaks.GPU_PEAKS" in pk["note"] and "measured" in pk["note"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert P.gpu_peaks("cuda")["source"] == "table:H100 PCIe"


def test_cpu_calibration_is_short_and_positive():
    pk = P.cpu_peaks(gemm_n=256, stream_mib=8, repeats=2)
    assert pk["device"] == "cpu" and pk["source"] == "measured" and pk["threads"] == torch.get_num_threads()
    assert pk["compute_gflop_s"] == pk["compute_by_dtype_gflop_s"]["fp32"] > 0
    cal = pk["calibration"]
    assert pk["bandwidth_gb_s"] == max(cal["copy_gb_s"], cal["add_gb_s"]) > 0
    assert cal["gemm_n"] == 256 and cal["stream_mib"] == 8 and cal["seconds"] < 30


def test_compute_peak_picks_the_dtype_roof():
    gpu = P.gpu_table_peaks("NVIDIA A100-SXM4-40GB")
    assert P.compute_peak(gpu, "torch.bfloat16") == (312000.0, "bf16")
    assert P.compute_peak(gpu, "float32") == (19500.0, "fp32")
    assert P.compute_peak(gpu, "float32", tf32=True) == (156000.0, "tf32")
    cpu = {"compute_gflop_s": 50.0, "compute_by_dtype_gflop_s": {"fp32": 50.0}}
    assert P.compute_peak(cpu, "bfloat16") == (50.0, "fp32 (no bf16 peak)")
    assert P.compute_peak(cpu, "fp32", tf32=True) == (50.0, "fp32")
    with pytest.raises(ValueError):
        P.dtype_key("int8")
