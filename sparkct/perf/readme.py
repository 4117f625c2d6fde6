"""The documentation's benchmark figures (docs/benchmarks.md), generated from the stored baselines
(benchmarks/baselines/*.json, written by `sparkct bench`), never typed by hand. (The module keeps its
name from when the tables lived in README.md.)

The page marks each generated block:

    <!-- bench:begin RUNNER [SELECT] -->
    ... generated ...
    <!-- bench:end -->

RUNNER names the baseline (benchmarks/baselines/RUNNER.json). SELECT is a glob on case ids (default
`*`; ids are `<suite>/<file stem>/<test>[<param>]`, so `kernels/bench_info_nce/*` or `data/*`), or
`roofline` for the roofline table of the runner's kernel cases (the PNG is written into the page's
own folder, img/roofline-RUNNER.png, so the docs site holds it, and linked). A block whose baseline
does not exist yet says so.

    python -m sparkct.perf.readme            # rewrite the blocks of docs/benchmarks.md (and the PNGs)
    python -m sparkct.perf.readme --check    # exit 1, with a diff, where the page differs from them
    python -m sparkct.perf.readme --doc OTHER.md     # another page with such blocks

tests/perf/test_perf_readme.py runs the check, so the page cannot drift from the baselines.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import glob
import os
import re
import sys

from sparkct.errors import UserError
from sparkct.io import read_json, write_text_atomic
from sparkct.perf import roofline
from sparkct.perf.roofline import fmt, resolve_peaks

__all__ = ["BLOCK", "find_blocks", "render_block", "render", "check", "main"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")  # the page whose blocks `main` rewrites by default
DOCS = os.path.dirname(DOC)
BLOCK = re.compile(
    r"(<!-- bench:begin (?P<runner>[\w.+-]+)(?: (?P<select>\S+))? -->\n)"
    r"(?P<body>.*?)(<!-- bench:end -->)",
    re.DOTALL,
)
_BEGIN = re.compile(r"<!-- bench:begin\b")
_END = re.compile(r"<!-- bench:end -->")

_FIGURES = {
    "gflop_per_s": "GFLOP/s",
    "tflop_per_s": "TFLOP/s",
    "gb_per_s": "GB/s",
    "images_per_s": "images/s",
    "slices_per_s": "slices/s",
    "steps_per_s": "steps/s",
}


def _heading(key: str) -> str:
    if key in _FIGURES:
        return _FIGURES[key]
    m = re.fullmatch(r"speedup_vs_(\w+)", key)
    if m:
        return f"× {m.group(1).replace('_', '-')}"
    return key.replace("_vs_", " vs ").replace("_", " ")


def find_blocks(text: str) -> list[re.Match]:
    """The marked blocks of `text`; a UserError for an unclosed or nested marker."""
    blocks = list(BLOCK.finditer(text))
    if len(_BEGIN.findall(text)) != len(blocks) or len(_END.findall(text)) != len(blocks):
        raise UserError(
            "the page's bench markers do not pair up: every '<!-- bench:begin RUNNER [SELECT] -->' "
            "needs its own '<!-- bench:end -->' on a line after it"
        )
    return blocks


def load_baseline(baselines: str, runner: str) -> dict | None:
    path = os.path.join(baselines, f"{runner}.json")
    return read_json(path) if os.path.isfile(path) else None


def _rel(path: str, base: str = DOCS) -> str:
    """`path` as the page links it: relative to the page's folder `base`."""
    try:
        return os.path.relpath(path, base)
    except ValueError:
        return path


def _repo_rel(baseline: str) -> str:
    """A baseline's path as written in the text: from the checkout holding it (the folder above
    benchmarks/baselines/), whichever folder the page is in."""
    path = os.path.abspath(baseline)
    return _rel(path, os.path.dirname(os.path.dirname(os.path.dirname(path))))


def _first(env: dict, *keys):
    return next((env[k] for k in keys if env.get(k) not in (None, "")), None)


def provenance(result: dict, path: str, base: str = DOCS) -> str:
    """One line: which file, which run, on what (the environment keys of sparkct.perf.environment)."""
    env = result.get("environment") or {}
    where = [str(result.get("runner", "?"))]
    if result.get("device") == "cuda":
        for key, pre in (
            (("gpu_name",), ""),
            (("gpu_driver", "driver"), "driver "),
            (("cuda_version", "cuda"), "CUDA "),
        ):
            v = _first(env, *key)
            if v:
                where.append(f"{pre}{v}")
    cpu = _first(env, "cpu_model", "cpu")
    if cpu:
        cores = _first(env, "cpu_usable_cores", "cores", "cpu_logical_cores")
        where.append(f"{cpu}{f' ({cores} cores)' if cores else ''}")
    threads = _first(env, "torch_threads", "threads")
    if threads:
        where.append(f"{threads} threads")
    for k in ("torch", "sparkct"):
        if env.get(k):
            where.append(f"{k} {env[k]}")
    commit = _first(env, "git_commit", "commit")
    if commit:
        where.append(f"commit {str(commit)[:10]}{' (dirty)' if env.get('git_dirty') else ''}")
    created = str(result.get("created", "?"))[:10]
    run = "quick" if result.get("quick") else "full"
    return (
        f"_Generated from `{_repo_rel(path)}` ({run} run of {created}: {', '.join(where)}) by "
        f"`python -m sparkct.perf.readme`; do not edit by hand._"
    )


def _test_of(case_id: str) -> str:
    return case_id.split("[", 1)[0]


def _param_of(case: dict) -> str:
    cid = case["id"]
    if "[" not in cid:
        return cid.rsplit("/", 1)[-1]
    parts = [p for p in cid.split("[", 1)[1].rstrip("]").split("-") if p not in ("cpu", "cuda")]
    return "-".join(parts)


def _case_table(cases: list[dict], roof: dict[str, dict]) -> list[str]:
    fig_keys: list[str] = []
    ratio_keys: list[str] = []
    for c in cases:
        for k in c.get("figures") or {}:
            if k not in fig_keys:
                fig_keys.append(k)
        for k in c.get("ratios") or {}:
            if k not in ratio_keys:
                ratio_keys.append(k)
    with_roof = any(c["id"] in roof for c in cases)
    any_bytes = any(roof.get(c["id"], {}).get("intensity") for c in cases)
    head = [
        "case",
        "median s",
        "±½IQR",
        "peak MiB",
        *(_heading(k) for k in fig_keys),
        *(_heading(k) for k in ratio_keys),
    ]
    if with_roof:
        head += (["FLOP/byte", "of roof"] if any_bytes else []) + ["of peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        t = c.get("time_s") or {}
        med, iqr = t.get("median"), t.get("iqr")
        spread = f"±{iqr / med / 2:.0%}" if med and iqr is not None else "—"
        pb = c.get("peak_bytes")
        row = [_param_of(c), fmt(med), spread, fmt(pb / 2**20) if pb else "—"]
        row += [fmt((c.get("figures") or {}).get(k)) for k in fig_keys]
        row += [fmt((c.get("ratios") or {}).get(k)) for k in ratio_keys]
        if with_roof:
            r = roof.get(c["id"])
            if any_bytes:
                row += [fmt(r and r["intensity"]), _pct(r and r["of_roof"])]
            row.append(_pct(r and r["of_peak"]))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _pct(x) -> str:
    return "—" if x is None else f"{x:.0%}" if x >= 0.1 else f"{x:.1%}"


def _peaks_or_none(result: dict) -> dict | None:
    try:
        return resolve_peaks(result)
    except UserError:
        return None


def render_block(runner: str, select: str | None, baselines: str, *, write_png: bool = True, base: str = DOCS) -> str:
    """The generated body of one block (ending in a newline)."""
    path = os.path.join(baselines, f"{runner}.json")
    result = load_baseline(baselines, runner)
    if result is None:
        return f"_(Generated from `{_repo_rel(path)}` once a {runner} baseline is stored there.)_\n"
    out = [provenance(result, path, base), ""]
    peaks = _peaks_or_none(result)
    if select == "roofline":
        if peaks is None:
            return "\n".join(out + ["_The baseline stores no device peaks: no roofline._"]) + "\n"
        rows = roofline.points(result, peaks)
        if not rows:
            return "\n".join(out + ["_No case of the baseline records its FLOPs: no roofline._"]) + "\n"
        png = os.path.join(base, "img", f"roofline-{runner}.png")
        if write_png:
            roofline.plot(rows, peaks, png, title=f"{runner}: {roofline.peaks_line(peaks)}")
        out += [f"![roofline of {runner}]({_rel(png, base)})", "", roofline.markdown(rows, peaks).rstrip("\n")]
        return "\n".join(out) + "\n"
    pattern = select or "*"
    cases = [c for c in result.get("cases", []) if fnmatch.fnmatchcase(c["id"], pattern)]
    if not cases:
        return "\n".join(out + [f"_No case of the baseline matches `{pattern}`._"]) + "\n"
    roof = {r["id"]: r for r in roofline.points(result, peaks)} if peaks else {}
    if peaks:
        out += [f"Device peaks: {roofline.peaks_line(peaks)}.", ""]
    tests: dict[str, list[dict]] = {}
    for c in cases:
        tests.setdefault(_test_of(c["id"]), []).append(c)
    for test, group in tests.items():
        out += [f"`{test}`", ""] + _case_table(group, roof) + [""]
    return "\n".join(out).rstrip("\n") + "\n"


def render(text: str, baselines: str, *, write_png: bool = True, base: str = DOCS) -> str:
    """`text` (a page in folder `base`) with every block regenerated from `baselines`."""
    find_blocks(text)
    cache: dict[tuple, str] = {}

    def sub(m: re.Match) -> str:
        key = (m.group("runner"), m.group("select"))
        if key not in cache:
            cache[key] = render_block(*key, baselines, write_png=write_png, base=base)
        return m.group(1) + cache[key] + m.group(5)

    return BLOCK.sub(sub, text)


def check(readme: str, baselines: str) -> str:
    """A unified diff of the page `readme` against what the baselines generate ('' where they agree),
    plus a line per roofline PNG a block links but that is missing."""
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    base = os.path.dirname(os.path.abspath(readme))
    want = render(text, baselines, write_png=False, base=base)
    diff = "".join(
        difflib.unified_diff(
            text.splitlines(True), want.splitlines(True), fromfile=f"{readme} (as is)", tofile=f"{readme} (generated)"
        )
    )
    for m in re.finditer(r"!\[roofline of [^\]]*\]\(([^)]+)\)", want):
        if not os.path.isfile(os.path.join(base, m.group(1))):
            diff += f"missing {m.group(1)} (linked from {os.path.basename(readme)})\n"
    return diff


def unshown(text: str, baselines: str) -> list[str]:
    """Baselines that no block of the page shows."""
    shown = {m.group("runner") for m in find_blocks(text)}
    have = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(baselines, "*.json")))
    return [r for r in have if r not in shown]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sparkct.perf.readme", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 where the page differs")
    p.add_argument(
        "--doc",
        "--readme",
        dest="readme",
        default=DOC,
        help="the page holding the blocks (default: docs/benchmarks.md)",
    )
    p.add_argument("--baselines", default=os.path.join(ROOT, "benchmarks", "baselines"))
    args = p.parse_args(argv)
    try:
        with open(args.readme, encoding="utf-8") as f:
            text = f.read()
        for r in unshown(text, args.baselines):
            print(
                f"note: benchmarks/baselines/{r}.json is shown by no block of {args.readme} "
                f"(add <!-- bench:begin {r} [SELECT] --> ... <!-- bench:end -->)",
                file=sys.stderr,
            )
        if args.check:
            diff = check(args.readme, args.baselines)
            if diff:
                sys.stdout.write(diff)
                print(
                    f"{args.readme}'s benchmark blocks differ from the baselines: run python -m sparkct.perf.readme",
                    file=sys.stderr,
                )
                return 1
            print(f"{args.readme}: {len(find_blocks(text))} benchmark blocks match the baselines")
            return 0
        new = render(text, args.baselines, base=os.path.dirname(os.path.abspath(args.readme)))
        if new != text:
            write_text_atomic(args.readme, new)
            print(f"rewrote the benchmark blocks of {args.readme}")
        else:
            print(f"{args.readme}: benchmark blocks already match the baselines")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
