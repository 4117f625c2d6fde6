"""What a benchmark ran on: CPU, GPU, driver, clocks, versions, commit, and the runner class's slug
(``cpu-2core``, ``cuda-h200``) that decides whether absolute times of two runs may be compared."""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
from importlib import metadata

import sparkct

__all__ = ["collect", "runner_slug"]

_NVSMI_FIELDS = (
    "name",
    "driver_version",
    "clocks.sm",
    "clocks.max.sm",
    "clocks.mem",
    "clocks.max.mem",
    "power.limit",
    "persistence_mode",
)


def _cpuinfo() -> tuple[str | None, int | None]:
    """(model name, physical cores) from /proc/cpuinfo; (None, None) where it is not there."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return (platform.processor() or None), None
    model, cores, phys, core = None, set(), None, None
    for line in text.splitlines() + [""]:
        key, _, val = (s.strip() for s in line.partition(":"))
        if key == "model name" and model is None:
            model = val
        elif key == "physical id":
            phys = val
        elif key == "core id":
            core = val
        elif not line.strip():  # end of one processor's block
            if core is not None:
                cores.add((phys, core))
            phys = core = None
    return model, (len(cores) or None)


def _git(root: str | None) -> dict:
    if root is None:
        return {"git_commit": None, "git_dirty": None}

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    if head.returncode != 0:
        return {"git_commit": None, "git_dirty": None}
    return {
        "git_commit": head.stdout.strip(),
        "git_dirty": bool(status.stdout.strip()) if status.returncode == 0 else None,
    }


def _nvidia_smi() -> dict | None:
    """Name, driver, current and maximum clocks (MHz), power limit (W) of GPU 0, if nvidia-smi answers."""
    try:
        r = subprocess.run(
            ["nvidia-smi", "-i", "0", f"--query-gpu={','.join(_NVSMI_FIELDS)}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0 or not r.stdout.strip():
        return None
    vals = [v.strip() for v in r.stdout.strip().splitlines()[0].split(",")]
    out = {}
    for k, v in zip(_NVSMI_FIELDS, vals):
        try:
            out[k] = float(v) if k.startswith(("clocks", "power")) else v
        except ValueError:
            out[k] = None  # "[N/A]"
    return out


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def collect(device: str, root: str | None = None) -> dict:
    """The environment record of a sparkct-bench/1 file (flat keys; None where unknown)."""
    import torch  # noqa: PLC0415 (lazy: sparkct.perf imports no torch at import time)

    model, physical = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    env = {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sparkct": sparkct.__version__,
        "cpu_model": model,
        "cpu_physical_cores": physical,
        "cpu_logical_cores": os.cpu_count(),
        "cpu_usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "cuda_version": torch.version.cuda,
        "sparkct_cuda_kernels": None,
        "sparkct_cuda_version": None,
        "gpu_name": None,
        "gpu_capability": None,
        "gpu_memory_gib": None,
        "gpu_sm_count": None,
        "gpu_driver": None,
        "gpu_clocks_mhz": None,
        "gpu_power_limit_w": None,
        "gpu_persistence_mode": None,
        "peers": {d: _version(d) for d in ("lightly", "spconv", "pydicom")},
        **_git(root),
    }
    try:
        from sparkct import _ext  # noqa: PLC0415 (lazy: imports torch, and the extension may be unbuilt)

        env["sparkct_cuda_kernels"] = bool(_ext.with_cuda())
        env["sparkct_cuda_version"] = _ext.cuda_version()
    except (ImportError, OSError):  # the extension is not built: the data suite still runs
        pass
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(
            gpu_name=p.name,
            gpu_capability=f"{p.major}.{p.minor}",
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            gpu_sm_count=p.multi_processor_count,
        )
        smi = _nvidia_smi()
        if smi:
            env["gpu_driver"] = smi.get("driver_version")
            env["gpu_clocks_mhz"] = {
                k.replace("clocks.", "").replace(".", "_"): v for k, v in smi.items() if k.startswith("clocks")
            }
            env["gpu_power_limit_w"] = smi.get("power.limit")
            env["gpu_persistence_mode"] = smi.get("persistence_mode")
    return env


def runner_slug(device: str, env: dict) -> str:
    """The runner class: ``cpu-<usable cores>core`` or ``cuda-<GPU name>`` (``NVIDIA H200`` -> ``cuda-h200``)."""
    if device == "cuda":
        name = re.sub(r"^nvidia\s+", "", (env.get("gpu_name") or "unknown").strip().lower())
        return "cuda-" + (re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown")
    return f"cpu-{env.get('cpu_usable_cores') or env.get('cpu_logical_cores') or 0}core"
