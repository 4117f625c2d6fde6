"""sparkct: fast self-supervised pretraining on CT (SparK sparse masked convolution, fused InfoNCE,
CT DICOM data). Run `sparkct COMMAND -h` for a command's options.

A user's mistake (a bad flag value, a missing path) is reported in one line with exit status 2;
add -v for the traceback."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import sys

import sparkct
from sparkct.cliargs import Parser, run_command


def cmd_info(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415 (lazy: `sparkct -h` imports no torch)

    print(f"sparkct        {sparkct.__version__}")
    print(f"python         {platform.python_version()} ({sys.executable})")
    print(f"torch          {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        from sparkct import _ext  # noqa: PLC0415 (lazy: a missing extension is reported, not raised)
    except ImportError as e:
        print(f"extension      NOT LOADED: {e}")
        return 1
    info = _ext.build_info()
    print(f"built against  torch {info['torch_version']}, OpenMP {'on' if info['openmp'] else 'off'}")
    if info["with_cuda"]:
        rt = info["cuda_runtime_version"]
        drv = info["cuda_driver_version"]
        print(f"CUDA kernels   yes: CUDA {_ext.cuda_version()}, archs {', '.join(info['cuda_archs']) or '?'}")
        print(
            f"CUDA runtime   {_ext._cuda_version_str(rt) if rt else 'not loadable'}; "
            f"driver {_ext._cuda_version_str(drv) if drv else 'none'}"
        )
    else:
        print("CUDA kernels   no (CPU-only build)")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        print("devices        cpu (no CUDA device visible)")
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        print(
            f"device {i}       {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
            f"{p.multi_processor_count} SMs"
        )
    if info["with_cuda"] and n:
        major, minor = torch.cuda.get_device_capability(0)
        cap = f"{major}.{minor}"
        if info["cuda_archs"] and cap not in info["cuda_archs"]:
            print(
                f"WARNING: device 0 is sm {cap}, kernels were built for {info['cuda_archs']}; "
                f"rebuild with TORCH_CUDA_ARCH_LIST={cap}"
            )
    print(f"threads        {torch.get_num_threads()} (torch intra-op)")
    return 0


_COMMAND_MODULES = [
    "sparkct.train.cli",
    "sparkct.eval.cli",
    "sparkct.data.cli",
    "sparkct.train.profile",
    "sparkct.perf.bench_cli",
]
# `sparkct pretrain/export`, `sparkct finetune/report/experiment/eval probe`, `sparkct data ...`,
# `sparkct profile pretrain`, `sparkct bench`


def build_parser() -> argparse.ArgumentParser:
    # Building the parser imports no torch: `sparkct -h` must be instant. Commands import what they
    # need when they run.
    p = Parser(prog="sparkct", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks for errors (and debug logs)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("info", help="versions, build (CUDA version/archs) and visible devices")
    s.set_defaults(func=cmd_info)
    # Command groups defined next to the code they drive; each module has register(subparsers).
    for mod in _COMMAND_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = " ".join(
        x
        for x in (
            "sparkct",
            args.command,
            getattr(args, "profile_target", None),
            getattr(args, "data_command", None),
            getattr(args, "eval_command", None),
            getattr(args, "method", None),
        )
        if x
    )
    return run_command(args.func, args, name, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
