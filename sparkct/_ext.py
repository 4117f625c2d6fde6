"""Loading the compiled extension and what it reports about its build.

Importing this module loads ``sparkct._C``, which registers every op in ``torch.ops.sparkct``.
"""

from __future__ import annotations

import functools
import json

import torch

try:
    from sparkct import _C  # noqa: F401  (registers torch.ops.sparkct.*)
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "sparkct's compiled extension sparkct._C could not be loaded "
        f"({e}). Build it with `pip install --no-build-isolation -e .` against the torch you run "
        f"(torch {torch.__version__} is installed); see docs/building.md."
    ) from e


@functools.cache
def build_info() -> dict:
    """How the extension was built: torch version, CUDA version and archs (0 / "" when CPU-only),
    and the CUDA runtime/driver versions seen now."""
    info = json.loads(torch.ops.sparkct.build_info())
    info["cuda_archs"] = [f"{int(a) // 100}.{(int(a) % 100) // 10}" for a in info["cuda_archs"].split(",") if a]
    info["with_cuda"] = info["cuda_version"] > 0
    return info


def _cuda_version_str(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def cuda_version() -> str | None:
    """CUDA version the kernels were compiled with, e.g. "13.0", or None for a CPU-only build."""
    v = build_info()["cuda_version"]
    return _cuda_version_str(v) if v else None


def with_cuda() -> bool:
    return build_info()["with_cuda"]


@functools.cache
def _check_cuda_runtime() -> None:
    info = build_info()
    if not info["with_cuda"]:
        raise RuntimeError(
            "a CUDA tensor reached sparkct, but this sparkct build has no CUDA kernels "
            f"(built CPU-only against torch {info['torch_version']}). Rebuild on a machine with nvcc and "
            "a CUDA build of torch (`pip install --no-build-isolation -e .`, see docs/building.md), "
            "or move the tensors to the CPU."
        )
    built = cuda_version()
    torch_cuda = torch.version.cuda
    if torch_cuda is None:
        raise RuntimeError(
            f"sparkct's kernels were built for CUDA {built}, but the running torch "
            f"{torch.__version__} has no CUDA support."
        )
    if built.split(".")[0] != torch_cuda.split(".")[0]:
        raise RuntimeError(
            f"CUDA version mismatch: sparkct's kernels were built with CUDA {built}, the running torch "
            f"{torch.__version__} uses CUDA {torch_cuda}. Rebuild sparkct against this torch."
        )


def check_device(name: str, *tensors: torch.Tensor | None) -> torch.device:
    """All tensors on one device; CUDA only when this build has CUDA kernels matching torch's CUDA."""
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise ValueError(f"{name}: tensors are on different devices: {sorted(map(str, devices))}")
    dev = present[0].device
    if dev.type == "cuda":
        _check_cuda_runtime()
    elif dev.type not in ("cpu", "meta"):
        raise ValueError(f"{name}: device {dev} is not supported (cpu or cuda)")
    return dev


def _register_cuda_fallbacks() -> None:
    """In a CPU-only build, a CUDA tensor calling torch.ops.sparkct.* directly gets the same clear
    error as through the Python API instead of the dispatcher's 'Could not run ... CUDA backend'."""
    if with_cuda():
        return
    for qualname in torch._C._dispatch_get_all_op_names():
        if not qualname.startswith("sparkct::"):
            continue
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"):
            continue
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU"):
            continue

        def _raise(*args, **kwargs):
            _check_cuda_runtime()

        torch.library.impl(qualname, "CUDA")(_raise)


_register_cuda_fallbacks()
