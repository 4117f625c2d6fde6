"""`sparkct data ...` end to end."""
from __future__ import annotations

import os

from sparkct.cli import main


def test_synth_prepare_info_show_read(tmp_path, capsys):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    assert main(["data", "synth", src, "--patients", "2", "--size", "48", "--slices", "6", "-q"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and os.path.exists(os.path.join(src, "labels.csv"))
    assert main(["data", "prepare", src, dst, "-q", "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert "written" in out and "localizer" in out
    assert main(["data", "prepare", src, dst, "-q", "--size", "32"]) == 0
    assert "already cached" in capsys.readouterr().out
    assert main(["data", "prepare", src, dst, "-q", "--size", "40"]) == 2
    assert "--reset" in capsys.readouterr().err
    assert main(["data", "info", dst, "--csv", str(tmp_path / "slices.csv")]) == 0
    out = capsys.readouterr().out
    assert "slices" in out and "(32, 32)" in out
    rows = open(tmp_path / "slices.csv").read().splitlines()
    assert len(rows) > 6 and rows[0].startswith("slice,series_uid,patient")
    assert main(["data", "show", dst, "--out", str(tmp_path / "s.png"), "--n", "4", "--tile", "32"]) == 0
    assert os.path.getsize(tmp_path / "s.png") > 0
    capsys.readouterr()
    assert main(["data", "read", os.path.join(src, "dicom", "case_0000")]) == 0
    out = capsys.readouterr().out
    assert "6 slices of 48x48" in out and "localizer" in out


def test_data_package_needs_no_extension_or_torch_to_prepare():
    """`import sparkct.data` and the prepare path load neither torch nor the compiled extension;
    the torch parts load torch but never sparkct.ops / sparkct._C."""
    import subprocess
    import sys
    code = (
        "import sys\n"
        "import sparkct.data, sparkct.data.cache, sparkct.data.dicom, sparkct.data.synthetic, sparkct.data.cli\n"
        "from sparkct.data import prepare, read_series, synth\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "from sparkct.data import CTAugment, CTSliceDataset, SliceLoader, apply_windows\n"
        "bad = [m for m in sys.modules if m.startswith(('sparkct.ops', 'sparkct._C', 'sparkct._ext'))]\n"
        "assert not bad, bad\n"
        "import os, torch\n"
        "assert not [k for k in torch.ops.loaded_libraries if 'sparkct' in os.path.basename(k)], 'ops loaded'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_exports_are_not_shadowed_by_submodules():
    """`from sparkct.data import synth` must be the function whatever was imported before."""
    import importlib
    import pkgutil

    import sparkct.data as D
    mods = {m.name for m in pkgutil.iter_modules(D.__path__)}
    clash = mods & set(D.__all__)
    assert not clash, f"submodules named like exports: {clash}"
    for m in mods:
        importlib.import_module(f"sparkct.data.{m}")
    assert callable(D.synth) and callable(D.prepare)
