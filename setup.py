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

Incremental builds: objects live in a persistent folder, build/<python>-<cuda|cpu>-<env hash>/ (one per
environment and variant), never in the temporary folder pip hands to editable/wheel builds, so
ninja recompiles only sources whose text, included headers or command line changed; the link is
skipped when no object changed and the installed library is the one last linked (a stamp in that
folder). `python setup.py build_ext --inplace` (what scripts/setup.sh runs) and
`pip install --no-build-isolation -e .` share it. `rm -rf build` forces a full rebuild.

No GPU is needed to compile the CUDA sources: headers and libraries of pip's CUDA wheels
(site-packages/nvidia/...) are added to the search paths, so a toolkit that has only nvcc and
the runtime is enough.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
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
            raise SystemExit(
                f"{name}: {' '.join(bad)} is not supported: sparkct's kernels rely on NaN checks "
                "and exact exp / division / sqrt, which fast-math removes; drop the flag"
            )


def find_cuda_home() -> str | None:
    """The toolkit root. `which nvcc` may be a wrapper script outside the toolkit (as on the
    development machines: /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc), so a candidate
    only counts if it holds bin/nvcc and include/cuda_runtime.h."""

    def ok(root: str | None) -> bool:
        return (
            bool(root)
            and os.path.isfile(os.path.join(root, "bin", "nvcc"))
            and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))
        )

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


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _same_stat(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_size, sa.st_mtime_ns) == (sb.st_size, sb.st_mtime_ns)


def build_dir(variant: str, torch_version: str) -> str:
    """The persistent object folder: one per interpreter, variant and environment (the torch headers'
    paths are in every command line, so two environments sharing one folder would rebuild each
    other's objects)."""
    key = hashlib.sha256(f"{sys.prefix}|{torch_version}".encode()).hexdigest()[:10]
    return os.path.join(ROOT, "build", f"{sys.implementation.cache_tag}-{variant}-{key}")


def _use_environment_ninja() -> None:
    """This environment's ninja first on PATH, also when its python or pip is called without activating
    it: without ninja torch compiles every source on every build, and two ninja versions (a system
    1.11 beside pip's 1.13) do not read each other's build log, so each switch rebuilds everything."""
    bindir = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(bindir, "ninja")):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def make_build_ext(base, build_temp: str):
    """torch's BuildExtension with a persistent build folder and a link that runs only when needed.

    torch sets `force` (ninja decides what to compile), which also makes distutils relink and recopy
    the library on every run; here the link is skipped when the objects, the link command and the
    target library are those of the last link, and the library is copied in place only when it
    differs, by an atomic rename (a running process keeps the old file)."""
    _use_environment_ninja()  # before the command is constructed: torch looks for ninja then

    class BuildExt(base):
        def finalize_options(self) -> None:
            super().finalize_options()
            self.build_temp = build_temp  # pip's editable/wheel builds pass a fresh temporary folder

        def run(self) -> None:
            build_py = self.get_finalized_command("build_py")
            # the library the user ends up loading: in place (--inplace, editable installs) or build_lib
            self._targets = {
                ext.name: os.path.abspath(self._get_inplace_equivalent(build_py, ext)[0 if self.inplace else 1])
                for ext in self.extensions
            }
            self._stamps = []
            super().run()
            for stamp, sig, target in self._stamps:
                os.makedirs(os.path.dirname(stamp), exist_ok=True)
                tmp = stamp + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"signature": sig, "target": target, "sha256": _sha256(target)}, f)
                os.replace(tmp, stamp)

        def build_extension(self, ext) -> None:
            target = self._targets[ext.name]
            stamp = os.path.join(self.build_temp, f"link-{ext.name}.json")
            link = self.compiler.link_shared_object

            def link_if_changed(objects, output, *args, **kwargs):
                sig = hashlib.sha256(
                    json.dumps(
                        {
                            "objects": [(o, os.stat(o).st_size, os.stat(o).st_mtime_ns) for o in objects],
                            "linker": self.compiler.linker_so,
                            "args": args,
                            "kwargs": kwargs,
                            "output": os.path.basename(output),
                        },
                        default=str,
                        sort_keys=True,
                    ).encode()
                ).hexdigest()
                try:
                    with open(stamp) as f:
                        last = json.load(f)
                    fresh = (
                        last["signature"] == sig
                        and last["target"] == target
                        and os.path.isfile(target)
                        and last["sha256"] == _sha256(target)
                    )
                except (OSError, ValueError, KeyError):
                    fresh = False
                if fresh:
                    log(f"{ext.name} is up to date: nothing compiled, nothing linked ({self.build_temp})")
                    if not _same_stat(output, target):
                        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
                        shutil.copy2(target, output)  # where setuptools expects the build result
                    return None
                log(f"linking {os.path.basename(output)} ({len(objects)} objects)")
                result = link(objects, output, *args, **kwargs)
                self._stamps.append((stamp, sig, target))
                return result

            self.compiler.link_shared_object = link_if_changed
            try:
                super().build_extension(ext)
            finally:
                self.compiler.link_shared_object = link

        def copy_extensions_to_source(self) -> None:
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
                if _same_stat(inplace_file, regular_file) or (
                    os.path.isfile(inplace_file) and _sha256(inplace_file) == _sha256(regular_file)
                ):
                    continue
                tmp = inplace_file + ".tmp"
                shutil.copy2(regular_file, tmp)
                os.replace(tmp, inplace_file)

    return BuildExt


def main() -> None:
    reject_fast_math()
    force_cpu = truthy("SPARKCT_FORCE_CPU")
    cuda_home = None if force_cpu else find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it at import

    import torch  # noqa: PLC0415 (lazy: CUDA_HOME is set first: cpp_extension reads it at import)

    # "No CUDA runtime is found" only means no GPU is visible, which does not matter for compiling;
    # the line below says what is built. Other warnings of cpp_extension (e.g. no ninja) still show.
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda rec: not rec.getMessage().startswith("No CUDA runtime is found")
    )
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: PLC0415 (lazy: as above)

    torch_cuda = torch.version.cuda
    reasons = []
    if force_cpu:
        reasons.append("SPARKCT_FORCE_CPU is set")
    if torch_cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if not force_cpu and cuda_home is None:
        reasons.append("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    with_cuda = not reasons
    variant = "cuda" if with_cuda else "cpu"
    if not with_cuda and truthy("SPARKCT_FORCE_CUDA"):
        raise SystemExit("SPARKCT_FORCE_CUDA is set but CUDA kernels cannot be built: " + "; ".join(reasons))

    debug = truthy("SPARKCT_DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp", '-DSPARKCT_TORCH_VERSION="' + torch.__version__ + '"']
    cxx += os.environ.get("SPARKCT_CXX_FLAGS", "").split()
    sources = [
        os.path.relpath(p, ROOT)
        for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
        + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    ]
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
        nvcc += ["--expt-relaxed-constexpr", '-DSPARKCT_TORCH_VERSION="' + torch.__version__ + '"']
        nvcc += os.environ.get("SPARKCT_NVCC_FLAGS", "").split()
        ext = CUDAExtension(
            "sparkct._C",
            sources,
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=extra_link,
        )
        log(
            f"building CUDA + CPU kernels: torch {torch.__version__} (CUDA {torch_cuda}), "
            f"CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, "
            f"{len(sources)} sources"
        )
    else:
        ext = CppExtension(
            "sparkct._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=extra_link,
        )
        log(f"building CPU kernels only ({'; '.join(reasons)}): torch {torch.__version__}, {len(sources)} sources")
        if not force_cpu:
            log("WARNING: the CUDA kernels are NOT being compiled")

    setup(
        packages=find_packages(include=["sparkct", "sparkct.*"]),
        ext_modules=[ext],
        cmdclass={
            "build_ext": make_build_ext(
                BuildExtension.with_options(use_ninja=True), build_dir(variant, torch.__version__)
            )
        },
    )


if __name__ == "__main__":
    main()
