"""The GitHub workflows parse, run what .ci/run and gpu-check run, and their shell steps are valid bash."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest
import yaml  # PyYAML: a dependency of timm, which sparkct requires

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"


def load(name: str) -> dict:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    assert isinstance(doc, dict) and doc.get("jobs"), name
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as True
    return doc


def steps(doc: dict) -> list[dict]:
    return [s for job in doc["jobs"].values() for s in job["steps"]]


def scripts(doc: dict) -> str:
    return "\n".join(s.get("run", "") for s in steps(doc))


@pytest.mark.parametrize("name", ["ci.yml", "gpu.yml"])
def test_workflow_parses_with_named_steps_and_limits(name):
    doc = load(name)
    assert doc["on"] and doc["permissions"] == {"contents": "read"}
    for job in doc["jobs"].values():
        assert job["runs-on"] and job["timeout-minutes"] > 0
        for s in job["steps"]:
            assert ("uses" in s) != ("run" in s), s
            assert "run" not in s or s.get("name"), s


@pytest.mark.parametrize("name", ["ci.yml", "gpu.yml"])
def test_run_steps_are_valid_bash(name):
    bash = shutil.which("bash")
    for s in steps(load(name)):
        if "run" not in s:
            continue
        text = re.sub(r"\$\{\{.*?\}\}", "X", s["run"])  # GitHub expressions are filled in before bash runs
        r = subprocess.run([bash, "-n"], input=text, capture_output=True, text=True)
        assert r.returncode == 0, f"{name}: step {s.get('name')!r}: {r.stderr}"


def test_cpu_workflow_runs_ci_run_and_compiles_the_cuda_sources():
    doc = load("ci.yml")
    assert (ROOT / ".ci" / "run").is_file()
    assert "bash .ci/run" in scripts(doc)
    job = doc["jobs"]["cpu"]
    assert job["runs-on"].startswith("ubuntu-")
    assert "cuda-nvcc-13-0" in scripts(doc) and job["env"]["TORCH_CUDA_ARCH_LIST"]


def test_gpu_workflow_covers_what_the_issue_asks():
    doc = load("gpu.yml")
    job = doc["jobs"]["gpu"]
    labels = job["runs-on"]
    assert labels[0] == "self-hosted" and {"linux", "gpu", "cuda-13"} <= set(labels)
    text = scripts(doc)
    assert "bash scripts/setup.sh" in text and "_ext.with_cuda()" in text
    assert "pytest -q -ra -m cuda tests" in text
    for tool in ("memcheck", "racecheck"):
        assert re.search(
            rf"compute-sanitizer --tool {tool} --error-exitcode \d+ .*\n.*pytest -q -x -m cuda tests/ops", text
        ), tool
    assert re.search(r"sparkct bench --suite kernels --device cuda --compare \"\$BASELINE\" --fail-above 10%", text)
    assert "benchmarks/baselines/" in job["env"]["BASELINE"]
    assert "sparkct profile pretrain spark --device cuda" in text
    upload = [s for s in steps(doc) if s.get("uses", "").startswith("actions/upload-artifact")]
    assert upload and upload[0]["if"] == "always()" and "ci-artifacts/" in upload[0]["with"]["path"]
    # every script the workflow names exists
    for path in re.findall(r"\b((?:scripts|benchmarks|tests)/[\w./-]+\.(?:py|sh))\b", text):
        assert (ROOT / path).is_file(), path


def test_runner_labels_are_documented():
    doc = (ROOT / "docs" / "ci.md").read_text()
    for label in load("gpu.yml")["jobs"]["gpu"]["runs-on"]:
        assert f"`{label}`" in doc, label
    assert "SPARKCT_GPU_BASELINE" in doc
