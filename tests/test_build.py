"""The build reports itself, and bad device use gives clear errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from sparkct import _ext


def test_build_info_fields():
    info = _ext.build_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0], (
        "extension built against another torch than the one running"
    )
    assert isinstance(info["with_cuda"], bool)
    if info["with_cuda"]:
        assert _ext.cuda_version() is not None
        assert all(a.count(".") == 1 for a in info["cuda_archs"]), info["cuda_archs"]
    else:
        assert _ext.cuda_version() is None and info["cuda_archs"] == []


def test_cuda_built_when_torch_and_nvcc_allow():
    """CI compiles the CUDA sources: a CUDA torch plus nvcc must give a CUDA build."""
    if os.environ.get("SPARKCT_FORCE_CPU"):
        pytest.skip("CPU-only build requested")
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("no CUDA torch or no nvcc here")
    assert _ext.with_cuda(), "nvcc and a CUDA torch are present but the CUDA kernels were not built"


def test_cli_info_runs():
    r = subprocess.run([sys.executable, "-m", "sparkct.cli", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "CUDA kernels" in r.stdout and "sparkct" in r.stdout


def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match="different devices"):
        _ext.check_device("op", torch.zeros(1), torch.zeros(1, device="meta"))


def _fake_build(monkeypatch, cuda_version: int, torch_cuda):
    info = dict(_ext.build_info())
    info.update(cuda_version=cuda_version, with_cuda=cuda_version > 0)
    monkeypatch.setattr(_ext, "build_info", lambda: info)
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    _ext._check_cuda_runtime.cache_clear()


def test_cuda_tensor_on_cpu_only_build_is_a_clear_error(monkeypatch):
    _fake_build(monkeypatch, 0, "13.0")
    try:
        with pytest.raises(RuntimeError, match="without CUDA kernels|no CUDA kernels"):
            _ext._check_cuda_runtime()
    finally:
        _ext._check_cuda_runtime.cache_clear()


def test_built_and_runtime_cuda_mismatch_is_a_clear_error(monkeypatch):
    _fake_build(monkeypatch, 12080, "13.0")
    try:
        with pytest.raises(RuntimeError, match=r"CUDA version mismatch.*12\.8.*13\.0"):
            _ext._check_cuda_runtime()
    finally:
        _ext._check_cuda_runtime.cache_clear()
    _fake_build(monkeypatch, 13000, None)
    try:
        with pytest.raises(RuntimeError, match="no CUDA support"):
            _ext._check_cuda_runtime()
    finally:
        _ext._check_cuda_runtime.cache_clear()


# ---- incremental builds (setup.py) and set-up re-runs (scripts/setup.sh) ----------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TINY_SETUP = """
import importlib.util, os
from setuptools import setup
spec = importlib.util.spec_from_file_location("sparkct_setup", {setup_py!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
from torch.utils.cpp_extension import BuildExtension, CppExtension
ext = CppExtension("pkg._C", ["csrc/a.cpp", "csrc/b.cpp"], extra_compile_args={{"cxx": ["-O0"]}})
setup(name="tiny", version="0", packages=["pkg"], ext_modules=[ext],
      cmdclass={{"build_ext": mod.make_build_ext(BuildExtension.with_options(use_ninja=True),
                                                os.path.abspath("build/objs"))}})
"""


def _compiler_shims(tmp_path):
    """c++/g++/gcc/cc that record each call, then run the real compiler."""
    shims, log = tmp_path / "shims", tmp_path / "compiler.log"
    shims.mkdir()
    for name in ("c++", "g++", "gcc", "cc"):
        real = shutil.which(name)
        if real is None:
            continue
        p = shims / name
        p.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexec "{real}" "$@"\n')
        p.chmod(0o755)
    return shims, log


def _calls(log):
    """(compiled sources, number of links) since the last call; clears the log."""
    lines = log.read_text().splitlines() if log.exists() else []
    log.write_text("")
    compiled = sorted(
        os.path.basename(t) for ln in lines if " -c " in ln for t in ln.split() if t.endswith((".cpp", ".cu"))
    )
    links = sum(" -shared" in ln for ln in lines)
    return compiled, links


def test_setup_py_rebuilds_only_what_changed(tmp_path):
    """setup.py's build: a re-run on unchanged sources compiles and links nothing, also when handed a
    fresh temporary build folder as pip's editable installs do; a changed header recompiles only the
    source that includes it; a replaced library is relinked."""
    if not os.path.isfile(os.path.join(os.path.dirname(sys.executable), "ninja")):
        pytest.skip("no ninja in this environment")
    proj = tmp_path / "proj"
    (proj / "pkg").mkdir(parents=True)
    (proj / "csrc").mkdir()
    (proj / "pkg" / "__init__.py").write_text("")
    (proj / "csrc" / "h.h").write_text("#define H 1\n")
    (proj / "csrc" / "a.cpp").write_text('#include "h.h"\nint a() { return H; }\n')
    (proj / "csrc" / "b.cpp").write_text("int b() { return 2; }\n")
    (proj / "setup.py").write_text(_TINY_SETUP.format(setup_py=os.path.join(ROOT, "setup.py")))
    shims, log = _compiler_shims(tmp_path)
    # another ninja first on PATH (as a system ninja 1.11 beside pip's 1.13, whose build logs the other
    # does not read): setup.py must use this environment's own
    (shims / "ninja").write_text(f'#!/bin/sh\necho "foreign-ninja $*" >> "{log}"\nexit 1\n')
    (shims / "ninja").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX", "LDSHARED", "CFLAGS", "LDFLAGS")}
    env["PATH"] = os.pathsep.join([str(shims), env.get("PATH", "")])  # setup.py puts this environment's ninja first

    def build(*extra):
        r = subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace", *extra],
            cwd=proj,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "foreign-ninja" not in log.read_text()
        return _calls(log)

    assert build() == (["a.cpp", "b.cpp"], 1)
    lib = next((proj / "pkg").glob("_C*.so"))
    first = lib.read_bytes()
    assert build() == ([], 0)
    # pip's editable build: fresh temporary build_temp and build_lib, the library copied in place
    assert build("-t", str(tmp_path / "pip-tmp"), "-b", str(tmp_path / "pip-lib")) == ([], 0)
    assert lib.read_bytes() == first
    (proj / "csrc" / "h.h").write_text("#define H 3\n")
    assert build() == (["a.cpp"], 1)
    lib.write_bytes(b"not the library")
    assert build() == ([], 1)
    assert lib.read_bytes()[:4] == b"\x7fELF"


def _fake_venv(tmp_path):
    """An environment whose python/pip only record what set-up asks of them."""
    venv, log = tmp_path / "venv", tmp_path / "python.log"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'PATH="{venv}/bin:$PATH"\n')
    py = venv / "bin" / "python"
    py.write_text(f"""#!/bin/sh
if [ "$1" = -VV ]; then echo "Python 3.x (fake)"; exit 0; fi
if [ "$1" = - ]; then cat >/dev/null; echo "info" >> "{log}"; exit 0; fi
echo "$*" >> "{log}"
if [ -n "${{FAIL_ON:-}}" ] && echo "$*" | grep -q -- "$FAIL_ON"; then exit 1; fi
""")
    py.chmod(0o755)
    return venv, log


def test_setup_sh_skips_pip_when_nothing_changed(tmp_path):
    """scripts/setup.sh runs the pip steps only when what they depend on changed, and only counts
    them done when all succeeded; the (incremental) build and the report run every time."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "scripts", "setup.sh"), repo / "scripts" / "setup.sh")
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), repo / "pyproject.toml")
    venv, log = _fake_venv(tmp_path)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SPARKCT_", "VIRTUAL_ENV"))}

    def setup(**env):
        r = subprocess.run(
            ["bash", str(repo / "scripts" / "setup.sh")],
            env={**base, "SPARKCT_VENV": str(venv), **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        calls = log.read_text().splitlines() if log.exists() else []
        log.write_text("")
        return r.returncode, [c for c in calls if c.startswith("-m pip")], calls

    rc, pips, calls = setup()
    assert rc == 0 and any("-e .[" in c for c in pips) and any("torch==" in c for c in pips), calls
    assert "setup.py -q build_ext --inplace" in calls and calls[-1] == "info"
    rc, pips, calls = setup()
    assert rc == 0 and pips == [] and calls == ["setup.py -q build_ext --inplace", "info"], calls
    with open(repo / "pyproject.toml", "a") as f:
        f.write("\n# a new dependency\n")
    rc, pips, _ = setup(FAIL_ON="-e .")  # the editable install fails: not recorded as done
    assert rc != 0 and pips
    rc, pips, _ = setup()
    assert rc == 0 and any("-e .[" in c for c in pips)
    rc, pips, _ = setup(SPARKCT_TORCH="torch==9.9")
    assert rc == 0 and any("torch==9.9" in c for c in pips)
