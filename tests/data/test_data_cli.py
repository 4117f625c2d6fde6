"""`sparkct data ...` end to end."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sparkct.cli import build_parser, main


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
    from PIL import Image

    im = Image.open(tmp_path / "s.png")
    assert im.mode == "L" and im.width == 3 * 32 and im.height % 4 == 0 and im.height > 4 * 32
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
        "import sparkct.data.preparing, sparkct.data.workers\n"
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


def _one_line_error(capsys, argv, contains: str) -> str:
    assert main(argv) == 2, argv
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err and contains in err, (argv, err)
    return err


def test_mistakes_are_reported_in_one_line_before_any_work(tmp_path, capsys, synth_dir, cache_dir):
    nowhere = str(tmp_path / "nonexistent")
    err = _one_line_error(capsys, ["data", "info", nowhere], "no such folder")
    assert "resume" not in err  # no prepare ever ran there
    _one_line_error(capsys, ["data", "info", str(tmp_path)], "not a prepared cache")
    started = tmp_path / "started"
    started.mkdir()
    (started / "cache.json").write_text("{}")
    _one_line_error(capsys, ["data", "info", str(started)], "resume")
    _one_line_error(capsys, ["data", "info", cache_dir, "--csv", str(tmp_path / "missing" / "x.csv")], "does not exist")
    _one_line_error(capsys, ["data", "synth", str(tmp_path / "s"), "--patients", "0"], "patients")
    _one_line_error(capsys, ["data", "synth", str(tmp_path / "s"), "--min-series", "3"], "series per patient")
    _one_line_error(capsys, ["data", "synth", str(tmp_path / "s"), "--p-finding", "2"], "p_finding")
    assert not os.path.exists(tmp_path / "s")
    out = str(tmp_path / "missing" / "x.png")
    _one_line_error(capsys, ["data", "show", cache_dir, "--out", out], "does not exist")
    _one_line_error(capsys, ["data", "show", cache_dir, "--out", str(tmp_path / "x.txt")], "not an image")
    _one_line_error(
        capsys,
        ["data", "show", cache_dir, "--out", str(tmp_path / "x.png"), "--windows", "lung,nope"],
        "unknown window",
    )
    _one_line_error(capsys, ["data", "show", cache_dir, "--out", str(tmp_path / "x.png"), "--n", "0"], "--n")
    _one_line_error(capsys, ["data", "show", nowhere, "--out", str(tmp_path / "x.png")], "no such folder")
    dst = tmp_path / "c"
    for flags, what in [
        (["-j", "0"], "workers"),
        (["--size", "0"], "size"),
        (["--spacing", "-1"], "spacing"),
        (["--spacing", "nan"], "spacing"),
        (["--clip-min", "10", "--clip-max", "0"], "clip_min"),
        (["--order", "7"], "order"),
        (["--max-slice-pixels", "0"], "max_slice_pixels"),
        (["--size", "5000"], "pixel limit"),
    ]:
        _one_line_error(capsys, ["data", "prepare", synth_dir, str(dst), "-q", *flags], what)
        assert not os.path.exists(dst)  # checked before anything is written
    _one_line_error(capsys, ["data", "prepare", nowhere, str(dst)], "does not exist")
    _one_line_error(capsys, ["data", "prepare", synth_dir, synth_dir], "differ")
    _one_line_error(capsys, ["data", "read", nowhere], "no such file")
    with pytest.raises(FileNotFoundError):  # -v: the traceback
        main(["-v", "data", "info", nowhere])


def test_prepare_v_is_debug_logging_and_sparkct_v_tracebacks():
    p = build_parser()
    a = p.parse_args(["data", "prepare", "src", "dst", "-v"])
    assert a.debug and not a.verbose
    a = p.parse_args(["-v", "data", "prepare", "src", "dst"])
    assert a.verbose and not a.debug


def test_every_data_option_says_what_it_is_for():
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    data = sub.choices["data"]
    cmds = next(a for a in data._actions if isinstance(a, argparse._SubParsersAction))
    assert set(cmds.choices) == {"synth", "prepare", "info", "show", "read"}
    for name, parser in cmds.choices.items():
        assert parser.description, name
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"data {name} {action.dest}"
                assert "default" not in action.help, "the formatter shows defaults"
        assert "(default:" in parser.format_help() or name in ("info", "read")


def test_show_paints_each_window_in_greyscale_with_captions(cache_dir, tmp_path):
    from PIL import Image

    from sparkct.data import SliceCache, apply_windows
    from sparkct.data.cli import contact_sheet

    c = SliceCache(cache_dir)
    windows = [("lung", -600.0, 1500.0), ("bone", 400.0, 1800.0)]
    tile = 64
    sheet = contact_sheet(c, [3, 10], windows, tile)
    assert sheet.mode == "L" and sheet.width == 2 * tile
    cap = sheet.height // 2 - tile
    arr = np.asarray(sheet)
    for r, i in enumerate([3, 10]):
        y = r * (tile + cap)
        for k, (_, center, width) in enumerate(windows):
            want = np.asarray(
                Image.fromarray(np.rint(apply_windows(c[i], [(center, width)])[0] * 255).astype(np.uint8)).resize(
                    (tile, tile), Image.BILINEAR
                )
            )
            np.testing.assert_array_equal(arr[y + cap : y + cap + tile, k * tile : (k + 1) * tile], want)
            assert arr[y : y + cap, k * tile : (k + 1) * tile].max() > 150  # a caption is written there
