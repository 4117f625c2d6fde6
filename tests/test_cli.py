"""The sparkct command: instant help (no torch import), one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sparkct.cli import main


def test_help_imports_no_torch():
    code = (
        "import sys; from sparkct.cli import build_parser\n"
        "try:\n    build_parser().parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in ('torch', 'numpy', 'pydicom') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "pretrain" in r.stdout and "export" in r.stdout and "data" in r.stdout


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["pretrain", "nosuch"], "unknown method 'nosuch'"),
        (["pretrain", "spark", "--arch", "resnet999"], "unknown arch 'resnet999'"),
        (["pretrain", "spark", "--device", "gpu"], "unknown device 'gpu'"),
        (["pretrain", "spark", "--crop", "100"], "multiple of 32"),
        (["export", "/nonexistent/run", "--out", "x.pt"], "checkpoint not found"),
    ],
)
def test_user_mistakes_are_one_line_with_exit_2(argv, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_no_cuda_device_is_reported_before_any_work(capsys, tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "spark", "--device", "cuda"]) == 2
    assert "no CUDA device visible" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing synthesized or prepared


@pytest.mark.parametrize(
    "argv,prog,msg",
    [
        (
            ["pretrain", "spark", "--batch", "abc"],
            "sparkct pretrain spark",
            "argument --batch: invalid int value: 'abc'",
        ),
        (["finetune"], "sparkct finetune", "the following arguments are required: --data"),
        (["nosuch"], "sparkct", "invalid choice: 'nosuch'"),
        (["data", "prepare"], "sparkct data prepare", "the following arguments are required: src, dst"),
    ],
)
def test_argparse_errors_are_one_line_with_exit_2(argv, prog, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"{prog}: error: ") and msg in err, err
    assert err.endswith(f"(see {prog} -h)"), err


def test_help_still_shows_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "spark", "-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sparkct pretrain spark") and "--batch" in out


@pytest.mark.parametrize("windows", ["40/400", "lung,40/400", "-600/1500,bone"])
def test_windows_center_width_on_the_command_line(windows, tmp_path, monkeypatch):
    from sparkct.train.cli import pretrain_configs

    monkeypatch.chdir(tmp_path)
    _, cfg, _ = pretrain_configs("spark", [f"--windows={windows}", "--data", str(tmp_path)])
    assert cfg.windows == windows


def test_pretrain_list_names_every_method_with_a_description(capsys):
    # README points to `sparkct pretrain --list`; it crashed on methods without a class docstring
    from sparkct.models import METHODS

    assert main(["pretrain", "--list"]) == 0
    out = capsys.readouterr().out
    names = [ln.split()[0] for ln in out.splitlines() if ln and not ln[0].isspace()]
    assert names == list(METHODS)
    for ln in out.splitlines():
        if ln and not ln[0].isspace():
            assert len(ln.split(maxsplit=1)) == 2, f"no description: {ln!r}"


def test_output_cut_short_by_a_pipe_is_quiet():
    # `sparkct pretrain --list | head -1` printed a BrokenPipeError traceback
    code = (
        "import os, sys\n"
        "r, w = os.pipe()\n"
        "os.close(r)\n"  # the reader is gone before anything is written
        "os.dup2(w, 1)\n"
        "from sparkct.cli import main\n"
        "sys.exit(main(['pretrain', '--list']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 141, r.stderr
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["pretrain", "spark", "--seed", "-1"], "--seed must be between 0 and 2**32-1, got -1"),
        (["pretrain", "spark", "--seed", str(2**32)], "--seed must be between 0 and 2**32-1"),
        (["pretrain", "spark", "--out", "taken"], "/taken is a file; name a folder for the run"),
        (["pretrain", "spark", "--out", "taken/run"], "--out taken/run: /"),
        (["pretrain", "byol", "--batch", "1"], "BYOL needs at least 2 images"),
        (["finetune", "--data", "nodata", "--seed", "-1"], "--seed must be between 0 and 2**32-1"),
        (["finetune", "--data", "nodata", "--out", "taken"], "/taken is a file; name a folder for the run"),
    ],
)
def test_bad_run_flags_are_refused_before_the_run_folder(argv, msg, capsys, tmp_path, monkeypatch):
    # --seed -1 failed in numpy after --out was made; --out naming a file, after data and model set-up;
    # BYOL with one image, in BatchNorm
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("")
    out = tmp_path / "runs"
    assert main([*argv, "--device", "cpu"] + ([] if "--out" in argv else ["--out", str(out)])) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "data").exists()  # nothing written, nothing synthesized


def _weights_files(tmp_path) -> dict:
    import torch

    from sparkct.models.backbone import backbone_state, build_backbone

    sd = backbone_state(build_backbone("resnet18", in_chans=1)[0])
    files = {"other-arch": backbone_state(build_backbone("resnet34", in_chans=1)[0])}
    files["one-shape"] = dict(sd, **{"layer2.0.conv1.weight": torch.zeros(128, 64, 1, 1)})
    out = {}
    for name, state in files.items():
        out[name] = str(tmp_path / f"{name}.pt")
        torch.save(state, out[name])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("not torch\n")
    return {**out, "empty": str(tmp_path / "empty.pt"), "text": str(tmp_path / "text.pt")}


@pytest.mark.parametrize(
    "which,msg",
    [
        ("other-arch", "not weights of this resnet18 backbone: unexpected 96 (layer1.2.conv1.weight"),
        ("one-shape", "shape mismatch 1 (layer2.0.conv1.weight (128, 64, 1, 1) vs (128, 64, 3, 3))"),
        ("empty", "empty.pt: not a loadable weights file"),
        ("text", "text.pt: not a loadable weights file"),
    ],
)
def test_pretrain_weights_that_do_not_fit_are_one_line_before_any_work(which, msg, capsys, tmp_path, monkeypatch):
    # a size-mismatch traceback (another arch, one wrong tensor) or an IndexError (a zero-byte file) before
    monkeypatch.chdir(tmp_path)
    w = _weights_files(tmp_path)[which]
    out = tmp_path / "runs"
    assert main(["pretrain", "simclr", "--weights", w, "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "data").exists()
