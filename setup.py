"""Build sparkct._C: C++ CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc is found.

Environment switches
  SPARKCT_FORCE_CPU=1        build without CUDA kernels even where nvcc and a CUDA torch exist
  SPARKCT_FORCE_CUDA=1       fail instead of falling back to a CPU-only build when CUDA cannot be built
  TORCH_CUDA_ARCH_LIST       archs to compile for; default: the visible GPUs, else "8.0;9.0"
  SPARKCT_NVCC_FLAGS         extra nvcc flags (space separated; fast-math flags are rejected)
  SPARKCT_CXX_FLAGS          extra host compiler flags (idem)
  SPARKCT_DEBUG=1            -O0 -g (and -lineinfo for nvcc)
  CUDA_HOME                  the toolkit root (the folder above nvcc's bin/); found from nvcc otherwise
  MAX_JOBS                   parallel compile jobs (ninja)

No GPU is needed to compile the CUDA sources: headers and libraries of pip's CUDA wheels
(site-packages/nvidia/...) are added to the search paths, so a toolkit that has only nvcc and
the runtime is enough.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def log(msg: str) -> None:
    print(f"[sparkct setup] {msg}", file=sys.stderr, flush=True)


def truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


# The kernels need IEEE semantics: the host compiler's fast-math folds their NaN checks (x != x and
# std::isnan alike) to false, and nvcc's --use_fast_math makes the simple kernels -- the GPU tests'
# oracle -- use approximate exp / division / sqrt and flush fp32 subnormals to zero.
FAST_MATH = re.compile(r"use[_-]fast[_-]math|(?<!no-)fast-math|(?<!no-)finite-math-only|^-Ofast$")


def reject_fast_math(env=os.environ) -> None:
    for name in ("SPARKCT_NVCC_FLAGS", "SPARKCT_CXX_FLAGS"):
        bad = [t for t in env.get(name, "").split() if any(FAST_MATH.search(p) for p in re.split(r"[=,]", t))]
        if bad:
            raise SystemExit(f"{name}: {' '.join(bad)} is not supported: sparkct's kernels rely on NaN checks "
                             "and exact exp / division / sqrt, which fast-math removes; drop the flag")


def find_cuda_home() -> str | None:
    """The toolkit root. `which nvcc` may be a wrapper script outside the toolkit (as on the
    development machines: /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc), so a candidate
    only counts if it holds bin/nvcc and include/cuda_runtime.h."""
    def ok(root: str | None) -> bool:
        return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
            os.path.join(root, "include", "cuda_runtime.h"))

    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        if ok(env):
            return env
        log(f"CUDA_HOME={env} has no bin/nvcc + include/cuda_runtime.h; looking elsewhere")
    cands = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        cands.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script: take the path it execs
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for tok in head.decode(errors="ignore").split():
                    if tok.endswith("/bin/nvcc"):
                        cands.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    cands += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in cands:
        if ok(c):
            return os.path.realpath(c)
    return None


def pip_cuda_dirs() -> tuple[list[str], list[str]]:
    """Include and library folders of pip's CUDA wheels (nvidia/cu13, nvidia/cudnn, ...)."""
    incs, libs = [], []
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    for root in roots:
        base = os.path.join(root, "nvidia")
        if not os.path.isdir(base):
            continue
        for sub in sorted(os.listdir(base)):
            inc, lib = os.path.join(base, sub, "include"), os.path.join(base, sub, "lib")
            if os.path.isdir(inc):
                incs.append(inc)
            if os.path.isdir(lib):
                libs.append(lib)
    return incs, libs


def main() -> None:
    reject_fast_math()
    force_cpu = truthy("SPARKCT_FORCE_CPU")
    cuda_home = None if force_cpu else find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it at import

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    torch_cuda = torch.version.cuda
    reasons = []
    if force_cpu:
        reasons.append("SPARKCT_FORCE_CPU is set")
    if torch_cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if not force_cpu and cuda_home is None:
        reasons.append("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    with_cuda = not reasons
    if not with_cuda and truthy("SPARKCT_FORCE_CUDA"):
        raise SystemExit("SPARKCT_FORCE_CUDA is set but CUDA kernels cannot be built: " + "; ".join(reasons))

    debug = truthy("SPARKCT_DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp", "-DSPARKCT_TORCH_VERSION=\"" + torch.__version__ + "\""]
    cxx += os.environ.get("SPARKCT_CXX_FLAGS", "").split()
    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
               + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    include_dirs = [os.path.join(ROOT, "csrc")]
    library_dirs: list[str] = []
    extra_link = ["-fopenmp"]

    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            if torch.cuda.is_available():
                caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
                os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        incs, libs = pip_cuda_dirs()
        include_dirs += incs
        library_dirs += libs
        extra_link += [f"-Wl,-rpath,{d}" for d in libs] if libs else []
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        nvcc = ["-O0", "-g", "-lineinfo"] if debug else ["-O3", "-lineinfo"]
        nvcc += ["--expt-relaxed-constexpr", "-DSPARKCT_TORCH_VERSION=\"" + torch.__version__ + "\""]
        nvcc += os.environ.get("SPARKCT_NVCC_FLAGS", "").split()
        ext = CUDAExtension(
            "sparkct._C", sources, include_dirs=include_dirs, library_dirs=library_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=extra_link)
        log(f"building CUDA + CPU kernels: torch {torch.__version__} (CUDA {torch_cuda}), "
            f"CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, "
            f"{len(sources)} sources")
    else:
        ext = CppExtension("sparkct._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=extra_link)
        log(f"building CPU kernels only ({'; '.join(reasons)}): torch {torch.__version__}, {len(sources)} sources")
        if not force_cpu:
            log("WARNING: CUDA kernels are NOT being compiled")

    setup(
        packages=find_packages(include=["sparkct", "sparkct.*"]),
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
