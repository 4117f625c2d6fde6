"""`sparkct bench` results: pytest-benchmark's JSON turned into one sparkct-bench/1 file, the ratios the
regression gate reads, and the comparison with a baseline. Imports no torch.

A results file (sparkct-bench/1)::

    {"schema": "sparkct-bench/1", "created": "2026-11-30T13:00:00+00:00", "device": "cpu" | "cuda",
     "runner": "cpu-2core" | "cuda-h200", "quick": bool, "tier": "quick" | "default" | "full",
     "rounds": N or null (--rounds), "suites": ["kernels", ...], "complete": bool, "failed": [case ids],
     "environment": {...sparkct.perf.environment.collect()},
     "cases": [{"id": "kernels/bench_info_nce/test_info_nce[cpu-fp32-2N8192-D128-fwd+bwd-fused]",
                "suite": "kernels", "family": "bench_info_nce", "group": "info_nce-cpu-float32-...",
                "params": {...the sizes and implementation the benchmark recorded},
                "time_s": {"median", "min", "mean", "stddev", "iqr", "max", "rounds", "noise"},
                "peak_bytes": int, "flops": number (if known), "bytes": number (if known),
                "figures": {"gflop_per_s", "gb_per_s", "images_per_s", "slices_per_s", ...},
                "ratios": {"speedup_vs_naive": x, "mem_vs_naive": y, ...},
                "ratio_noise": {"speedup_vs_naive": band, ...}}]}

Noise. Every case runs at least one untimed call first (benchkit.run's warm-up, and its peak-memory
call), then its timed rounds; ``time_s.noise`` is the relative spread of those rounds: IQR / median from
4 rounds up, (max - min) / median with 2 or 3 (too few for quartiles), null with one.

Ratios (the figures the gate reads): each case is paired with its baseline implementation measured
in the same run and the same pytest-benchmark group (the "pairs" each benchmark file declares in its
BENCH table, sparkct.perf.registry): ``speedup_vs_<base>`` =
median time of the baseline / median time of the case (above 1: faster; against an ideal such as the
bare GEMMs or the shard reads it is the fraction of the ideal reached), ``mem_vs_<base>`` = peak extra
memory of the case / the baseline's (below 1: less). A speed-up's noise band is the two cases' noise
combined (root of the sum of squares); a memory ratio's is 0 (peak memory does not vary from round to
round). Ratios cancel most of what a shared or different machine changes (load, clocks, core count),
absolute times do not.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from sparkct.errors import UserError
from sparkct.perf.registry import Bench

__all__ = [
    "SCHEMA",
    "case_id",
    "noise_band",
    "convert",
    "validate",
    "load",
    "compare",
    "parse_percent",
    "format_cases",
    "format_comparison",
    "Comparison",
]

SCHEMA = "sparkct-bench/1"
# extra_info keys that are not figures: the timing and memory fields (kept elsewhere), labels, targets,
# and the benchmark files' own pairwise ratios, which their declared pairs recompute under one naming
_NOT_FIGURES = {
    "median_s",
    "peak_bytes",
    "peak_mib",
    "flops",
    "bytes_moved",
    "params",
    "device",
    "target",
    "target_per_worker",
    "torch_threads",
    "meets_target",
}
_OWN_RATIOS = ("speedup_vs_", "mem_vs_", "peak_ratio_vs_", "time_vs_", "sparse_speedup_vs_", "frac_of_gemm")
_RENAME = {"gflops_per_s": "gflop_per_s"}


def case_id(nodeid: str, benches: dict[str, Bench]) -> tuple[str, str, str]:
    """(case id, suite, family) of a pytest node id such as 'benchmarks/bench_data.py::test_x[a]';
    `benches`: the declarations (sparkct.perf.registry.discover), a family they lack is suite "other"."""
    path, _, name = nodeid.partition("::")
    family = os.path.splitext(os.path.basename(path))[0]
    suite = benches[family].suite if family in benches else "other"
    return f"{suite}/{family}/{name}", suite, family


def noise_band(stats: dict) -> float | None:
    """Relative spread of a case's timed rounds (see the module's doc)."""
    n, med = int(stats.get("rounds", 0)), stats.get("median") or 0.0
    if n < 2 or med <= 0:
        return None
    spread = stats["iqr"] if n >= 4 else stats["max"] - stats["min"]
    return spread / med


def _clean(v):
    """pytest-benchmark writes parameters it cannot serialize as 'UNSERIALIZABLE[torch.float32]'."""
    if isinstance(v, str) and v.startswith("UNSERIALIZABLE[") and v.endswith("]"):
        return v[len("UNSERIALIZABLE[") : -1]
    return v


def _matches(axes: dict, sel: dict) -> bool:
    return all(k in axes and axes[k] == v for k, v in sel.items())


def _combine(*bands) -> float | None:
    if any(b is None for b in bands):
        return None
    return math.sqrt(sum(b * b for b in bands))


def _add_ratios(cases: list[dict], axes: dict[str, dict], benches: dict[str, Bench]) -> None:
    """Fill case["ratios"] and case["ratio_noise"] from the declared pairs. `axes`: case id -> pytest
    parameters + "test"."""
    by_group: dict[tuple, list[dict]] = {}
    for c in cases:
        by_group.setdefault((c["family"], c["group"]), []).append(c)
    for c in cases:
        a = axes[c["id"]]
        pairs = benches[c["family"]].pairs if c["family"] in benches else ()
        for p in pairs:
            if not _matches(a, p.case) or _matches(a, p.base):
                continue
            found = []
            for b in by_group[(c["family"], c["group"])]:
                ba = axes[b["id"]]
                if b is c or not _matches(ba, p.base):
                    continue
                shared = (set(a) & set(ba)) - set(p.base) - {"test"}
                if all(a[k] == ba[k] for k in shared):
                    found.append(b)
            if not found:
                continue
            if len(found) > 1:
                raise RuntimeError(
                    f"{c['family']}.py's pairs are ambiguous: {c['id']} has baselines {[b['id'] for b in found]}"
                )
            b = found[0]
            name = f"speedup_vs_{p.label}"
            if name in c["ratios"]:
                raise RuntimeError(f"{c['family']}.py's pairs give {c['id']} two {name}")
            c["ratios"][name] = b["time_s"]["median"] / c["time_s"]["median"]
            c["ratio_noise"][name] = _combine(c["time_s"]["noise"], b["time_s"]["noise"])
            if p.memory and b.get("peak_bytes") and c.get("peak_bytes") is not None:
                c["ratios"][f"mem_vs_{p.label}"] = c["peak_bytes"] / b["peak_bytes"]
                c["ratio_noise"][f"mem_vs_{p.label}"] = 0.0


def convert(
    raw: dict,
    *,
    benches: dict[str, Bench],
    device: str,
    runner: str,
    tier: str,
    suites: list[str],
    environment: dict,
    created: str,
    rounds: int | None = None,
    complete: bool = True,
    failed: list[str] = (),
) -> dict:
    """A sparkct-bench/1 document from pytest-benchmark's --benchmark-json output; `benches`: the benchmark
    files' declarations (sparkct.perf.registry.discover), which give each case its suite and ratios."""
    cases, axes = [], {}
    for b in raw.get("benchmarks", []):
        cid, suite, family = case_id(b["fullname"], benches)
        name = cid.split("/", 2)[2]
        st, extra = b["stats"], dict(b.get("extra_info") or {})
        params = extra.get("params")
        if params is None:  # a benchmark that records its case outside benchkit.run
            params = {k: _clean(v) for k, v in (b.get("params") or {}).items()}
        time_s = {k: st[k] for k in ("median", "min", "mean", "stddev", "iqr", "max", "rounds")}
        time_s["noise"] = noise_band(st)
        figures = {}
        for k, v in extra.items():
            if k in _NOT_FIGURES or k in params or k.startswith(_OWN_RATIOS):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                figures[_RENAME.get(k, k)] = v
        case = {
            "id": cid,
            "suite": suite,
            "family": family,
            "group": b.get("group"),
            "params": params,
            "time_s": time_s,
            "peak_bytes": extra.get("peak_bytes"),
            "figures": figures,
            "ratios": {},
            "ratio_noise": {},
        }
        if "flops" in extra:
            case["flops"] = extra["flops"]
        if "bytes_moved" in extra:
            case["bytes"] = extra["bytes_moved"]
        cases.append(case)
        axes[case["id"]] = {"test": name.split("[")[0], **{k: _clean(v) for k, v in (b.get("params") or {}).items()}}
    _add_ratios(cases, axes, benches)
    return {
        "schema": SCHEMA,
        "created": created,
        "device": device,
        "runner": runner,
        "quick": tier == "quick",
        "tier": tier,
        "rounds": rounds,
        "suites": list(suites),
        "complete": bool(complete),
        "failed": list(failed),
        "environment": environment,
        "cases": cases,
    }


# ---- validation --------------------------------------------------------------------------------------


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# The environment fields the reports read (sparkct.perf.environment.collect writes them), each null or of
# this type: a wrong type would surface later as a TypeError in the tables
_ENV_TYPES: dict[str, type | tuple[type, ...]] = {
    "git_commit": str,
    "git_dirty": bool,
    "hostname": str,
    "os": str,
    "python": str,
    "torch": str,
    "sparkct": str,
    "cpu_model": str,
    "cuda_version": str,
    "gpu_name": str,
    "gpu_driver": str,
    "sparkct_cuda_version": str,
    "cpu_physical_cores": int,
    "cpu_logical_cores": int,
    "cpu_usable_cores": int,
    "torch_threads": int,
    "gpu_sm_count": int,
    "gpu_memory_gib": (int, float),
    "peers": dict,
}
# the roofline's numeric peaks (sparkct.perf.peaks.device_peaks), each null or a number > 0
_PEAK_FIGURES = ("compute_gflop_s", "bandwidth_gb_s")


def _type_name(kind) -> str:
    return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def _check_environment(env: dict, peaks, bad) -> None:
    for key, kind in _ENV_TYPES.items():
        v = env.get(key)
        if v is not None and (not isinstance(v, kind) or isinstance(v, bool) and kind is not bool):
            bad(f"'environment.{key}' must be a {_type_name(kind)} or null, got {v!r}")
    if peaks is None:
        return
    if not isinstance(peaks, dict):
        bad(f"'peaks' must be an object (sparkct.perf.peaks.device_peaks) or null, got {peaks!r}")
    for key in _PEAK_FIGURES:
        v = peaks.get(key)
        if v is not None and not (_num(v) and v > 0):
            bad(f"'peaks.{key}' must be a number > 0 or null, got {v!r}")
    by = peaks.get("compute_by_dtype_gflop_s")
    if by is not None and (not isinstance(by, dict) or not all(v is None or _num(v) and v > 0 for v in by.values())):
        bad(f"'peaks.compute_by_dtype_gflop_s' must map dtypes to numbers > 0, got {by!r}")


def _check_ratio(name: str, v, bad, where: str) -> None:
    # A ratio is relative: the gate reads new/old - 1, which means nothing for a ratio <= 0. Only a memory
    # ratio may be 0: convert writes it for a case with no extra peak memory, and _judge handles an old 0.
    ok = math.isfinite(v) and (v > 0 or v == 0 and name.startswith("mem_vs_"))
    if not ok:
        bad(f"{where}: ratio {name!r} is {v!r}; ratios must be finite and > 0")


def validate(doc, source: str = "results") -> dict:
    """`doc` if it is a sparkct-bench/1 document; else a UserError naming `source` and the first problem."""

    def bad(msg):
        raise UserError(f"{source}: {msg}")

    if not isinstance(doc, dict):
        bad(f"not a sparkct bench results file (a JSON {type(doc).__name__}, not an object)")
    if doc.get("schema") != SCHEMA:
        if "benchmarks" in doc and "machine_info" in doc:
            bad("this is pytest-benchmark's --benchmark-json output; compare files written by `sparkct bench --json`")
        bad(f"schema {doc.get('schema')!r}, expected {SCHEMA!r} (a file written by `sparkct bench --json`)")
    for key, kind in (
        ("created", str),
        ("device", str),
        ("runner", str),
        ("quick", bool),
        ("suites", list),
        ("environment", dict),
        ("cases", list),
    ):
        if not isinstance(doc.get(key), kind):
            bad(f"{key!r} missing or not a {kind.__name__}")
    if doc["device"] not in ("cpu", "cuda"):
        bad(f"device {doc['device']!r} is neither 'cpu' nor 'cuda'")
    if not doc["runner"]:
        bad("empty 'runner'")
    _check_environment(doc["environment"], doc.get("peaks"), bad)
    seen = set()
    for i, c in enumerate(doc["cases"]):
        where = f"case {i}"
        if not isinstance(c, dict) or not isinstance(c.get("id"), str) or not c["id"]:
            bad(f"{where}: no 'id'")
        where = f"case {c['id']!r}"
        if c["id"] in seen:
            bad(f"{where} appears twice")
        seen.add(c["id"])
        for key in ("suite", "family"):
            if not isinstance(c.get(key), str):
                bad(f"{where}: {key!r} missing or not a string")
        t = c.get("time_s")
        if not isinstance(t, dict) or not _num(t.get("median")) or t["median"] <= 0 or not _num(t.get("min")):
            bad(f"{where}: 'time_s' needs a positive 'median' and a 'min'")
        if not isinstance(t.get("rounds"), int) or t["rounds"] < 1:
            bad(f"{where}: 'time_s.rounds' must be a positive integer")
        if t.get("noise") is not None and not _num(t["noise"]):
            bad(f"{where}: 'time_s.noise' must be a number or null")
        if c.get("peak_bytes") is not None and not _num(c["peak_bytes"]):
            bad(f"{where}: 'peak_bytes' must be a number or null")
        if not isinstance(c.get("params"), dict):
            bad(f"{where}: 'params' missing or not an object")
        for key in ("figures", "ratios"):
            d = c.get(key)
            if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
                bad(f"{where}: {key!r} must map names to numbers")
            for k, v in d.items():
                if key == "ratios" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    _check_ratio(k, v, bad, where)
                if not _num(v):
                    bad(f"{where}: {key!r} must map names to numbers")
        rn = c.get("ratio_noise", {})
        if not isinstance(rn, dict) or not all(v is None or _num(v) for v in rn.values()):
            bad(f"{where}: 'ratio_noise' must map names to numbers or null")
    return doc


def load(path: str, source: str) -> dict:
    """Read and validate a results file; a UserError for a missing file, not JSON, or the wrong shape."""
    if not os.path.isfile(path):
        raise UserError(f"{source} {path!r}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{source} {path!r}: not JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{source} {path!r}: not JSON (not UTF-8 text)") from None
    return validate(doc, f"{source} {path!r}")


def parse_percent(s: str) -> float:
    """'10%' or '10' -> 0.10; a UserError for anything else (negative, not a number)."""
    t = str(s).strip()
    num = t[:-1].strip() if t.endswith("%") else t
    try:
        v = float(num)
    except ValueError:
        raise UserError(f"--fail-above {s!r}: expected a percentage such as 10% (or 10)") from None
    if not math.isfinite(v) or v < 0:
        raise UserError(f"--fail-above {s!r}: must be a percentage >= 0")
    return v / 100.0


# ---- comparison --------------------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    figure: str  # "time" (median s), "peak_bytes", a ratio name, or "-" for a whole case
    old: float | None
    new: float | None
    change: float | None  # new / old - 1
    band: float | None  # noise band of the change (relative)
    verdict: str  # improved, regressed, within noise, missing, new, sizes changed
    gated: bool  # does this figure decide the exit status?
    fail: bool = False  # regressed past the threshold, beyond noise


@dataclass
class Comparison:
    rows: list[Row] = field(default_factory=list)
    threshold: float = 0.10
    ratios_gated: bool = True
    absolute_gated: bool = False
    notes: list[str] = field(default_factory=list)
    missing_cases: list[str] = field(default_factory=list)
    new_cases: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.fail]


def _band(old: float | None, new: float | None) -> float | None:
    """Noise band of a change between two runs: both runs' bands combined; an unknown one (a single
    round) counts as 0, and None when neither is known."""
    known = [x for x in (old, new) if x is not None]
    return math.sqrt(sum(x * x for x in known)) if known else None


def _judge(case, figure, old, new, band, higher_better, gated, threshold) -> Row:
    if old is None or new is None:
        return Row(case, figure, old, new, None, band, "missing" if new is None else "new", False)
    if old == 0:
        change = 0.0 if new == 0 else math.inf
    else:
        change = new / old - 1.0
    worse = -change if higher_better else change
    b = band or 0.0
    if abs(change) <= b or change == 0:
        verdict = "within noise"
    else:
        verdict = "regressed" if worse > 0 else "improved"
    fail = gated and verdict == "regressed" and worse > threshold
    return Row(case, figure, old, new, change, band, verdict, gated, fail)


def machine(doc: dict) -> str:
    """The runner class a results file was measured on: its runner slug and, for CPU runs, the CPU model
    (``cpu-2core AMD EPYC``). Speed-up ratios are stable within one class, not across classes: the
    sparse conv's speed-up over spconv measured 5.7 on a 2-core AMD EPYC and 2.9 on a 2-core Intel Xeon."""
    if doc.get("device") == "cuda":
        return str(doc["runner"])
    model = (doc.get("environment") or {}).get("cpu_model") or "unknown CPU"
    return f"{doc['runner']} {model}"


def gate_refusal(baseline: dict, here: str, flag: str) -> str | None:
    """Why `baseline` cannot gate a run on the runner class `here` (None when it can)."""
    there = machine(baseline)
    if there == here:
        return None
    return (
        f"{flag}: the baseline was measured on {there} and this run is on {here}; a baseline gates only "
        f"the runner class it was measured on (speed-up ratios move between CPU models). Record one here "
        f"first (sparkct bench --suite SUITE --json base.json, on the commit to compare against) and "
        f"compare with it, or leave out {flag} to see the changes without a gate"
    )


def compare(old: dict, new: dict, *, threshold: float = 0.10, gate_absolute: bool = False) -> Comparison:
    """Every ratio, median time and peak memory of the cases both runs measured. Ratios gate (a regression
    past `threshold` and beyond the noise band fails) when both runs are of the same runner class
    (:func:`machine`); absolute figures gate only with `gate_absolute` as well."""
    cmp = Comparison(threshold=threshold)
    same = machine(old) == machine(new)
    cmp.ratios_gated = same
    cmp.absolute_gated = gate_absolute and same
    if not same:
        cmp.notes.append(
            f"not gated: the baseline was measured on {machine(old)}, this run on {machine(new)}; a baseline "
            "gates only the runner class it was measured on (record one on this machine to gate)"
        )
    elif not gate_absolute:
        cmp.notes.append(
            "absolute times and peak memory are shown, not gated (--gate-absolute gates them "
            "when the runner class is the same)"
        )
    if old["device"] != new["device"]:
        cmp.notes.append(
            f"the baseline is a {old['device']} run, this is a {new['device']} run: no case is common to both"
        )
    olds = {c["id"]: c for c in old["cases"]}
    news = {c["id"]: c for c in new["cases"]}
    for cid, o in olds.items():
        n = news.get(cid)
        if n is None:
            cmp.missing_cases.append(cid)
            cmp.rows.append(Row(cid, "-", None, None, None, None, "missing", False))
            continue
        if o.get("params") != n.get("params"):
            cmp.rows.append(Row(cid, "-", None, None, None, None, "sizes changed", False))
            continue
        for name in sorted(set(o["ratios"]) | set(n["ratios"])):
            band = _band(o.get("ratio_noise", {}).get(name), n.get("ratio_noise", {}).get(name))
            cmp.rows.append(
                _judge(
                    cid,
                    name,
                    o["ratios"].get(name),
                    n["ratios"].get(name),
                    band,
                    not name.startswith("mem_"),
                    cmp.ratios_gated,
                    threshold,
                )
            )
        band = _band(o["time_s"].get("noise"), n["time_s"].get("noise"))
        cmp.rows.append(
            _judge(
                cid, "time", o["time_s"]["median"], n["time_s"]["median"], band, False, cmp.absolute_gated, threshold
            )
        )
        if o.get("peak_bytes") is not None and n.get("peak_bytes") is not None:
            cmp.rows.append(
                _judge(cid, "peak_bytes", o["peak_bytes"], n["peak_bytes"], 0.0, False, cmp.absolute_gated, threshold)
            )
    for cid in news:
        if cid not in olds:
            cmp.new_cases.append(cid)
            cmp.rows.append(Row(cid, "-", None, None, None, None, "new", False))
    return cmp


# ---- tables ------------------------------------------------------------------------------------------


def _secs(t: float | None) -> str:
    if t is None:
        return "-"
    if t >= 1:
        return f"{t:.3g} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms"
    return f"{t * 1e6:.3g} us"


def _pct(x: float | None) -> str:
    if x is None:
        return "?"
    if math.isinf(x):
        return "inf"
    return f"{x * 100:.0f}%"


def _value(figure: str, v: float | None) -> str:
    if v is None:
        return "-"
    if figure == "time":
        return _secs(v)
    if figure == "peak_bytes":
        return f"{v / 2**20:.4g} MiB"
    return f"{v:.4g}"


def _short(cid: str) -> str:
    """kernels/bench_info_nce/test_info_nce[x] -> bench_info_nce::test_info_nce[x]"""
    parts = cid.split("/", 2)
    return f"{parts[1]}::{parts[2]}" if len(parts) == 3 else cid


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def fmt(r):
        return "  ".join(c.ljust(w) if i in (0, len(r) - 1) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join(fmt(r).rstrip() for r in [header, ["-" * w for w in widths], *rows])


_HEADLINE = (
    ("gflop_per_s", "GFLOP/s"),
    ("gb_per_s", "GB/s"),
    ("images_per_s", "images/s"),
    ("slices_per_s", "slices/s"),
)


def format_cases(doc: dict) -> str:
    env = doc["environment"]
    commit = (env.get("git_commit") or "?")[:10] + (" (dirty)" if env.get("git_dirty") else "")
    head = (
        f"sparkct bench: {len(doc['cases'])} cases, {doc['runner']} ({env.get('cpu_model') or '?'}"
        + (f", {env['gpu_name']}" if env.get("gpu_name") else "")
        + f"), {doc.get('tier', '?')} sizes, "
        f"suites {', '.join(doc['suites'])}, commit {commit}"
    )
    rows = []
    for c in doc["cases"]:
        t = c["time_s"]
        figs = [f"{c['figures'][k]:.4g} {unit}" for k, unit in _HEADLINE if k in c["figures"]]
        rats = [
            f"{k} {v:.3g}" + (f" ±{_pct(c.get('ratio_noise', {}).get(k))}" if c.get("ratio_noise", {}).get(k) else "")
            for k, v in c["ratios"].items()
        ]
        peak = "-" if c.get("peak_bytes") is None else f"{c['peak_bytes'] / 2**20:.4g}"
        rows.append(
            [
                _short(c["id"]),
                _secs(t["median"]),
                _secs(t["min"]),
                f"±{_pct(t.get('noise'))}",
                str(t["rounds"]),
                peak,
                ", ".join(figs + rats),
            ]
        )
    out = [head, _table(["case", "median", "min", "noise", "rounds", "peak MiB", "figures and ratios"], rows)]
    if doc.get("failed"):
        out.append(f"FAILED ({len(doc['failed'])}): " + ", ".join(doc["failed"]))
    if not doc.get("complete", True):
        out.append("INCOMPLETE: the run stopped before every case was measured")
    return "\n".join(out)


def format_comparison(cmp: Comparison, old: dict, new: dict) -> str:
    """The ratio figures (all of them), the absolute figures that moved beyond noise, the missing and new
    cases, and the gate's verdict."""
    shown = [
        r
        for r in cmp.rows
        if r.figure != "-"  # whole missing / new cases: listed below the table
        and (r.figure not in ("time", "peak_bytes") or r.verdict != "within noise")
    ]
    rows = [
        [
            _short(r.case),
            r.figure,
            _value(r.figure, r.old),
            _value(r.figure, r.new),
            "-" if r.change is None else ("+inf" if math.isinf(r.change) else f"{r.change * 100:+.1f}%"),
            "-" if r.change is None else f"±{_pct(r.band)}",
            r.verdict
            + (" FAIL" if r.fail else "")
            + (" (not gated)" if r.figure in ("time", "peak_bytes") and not r.gated else ""),
        ]
        for r in shown
    ]
    ratio_rows = [r for r in cmp.rows if r.figure not in ("time", "peak_bytes", "-") and r.old is not None]
    hidden = len([r for r in cmp.rows if r.figure in ("time", "peak_bytes") and r not in shown])
    out = [
        f"compared with the {machine(old)} baseline of {old['created']} "
        f"(commit {(old['environment'].get('git_commit') or '?')[:10]}): "
        + (
            f"fail above {cmp.threshold * 100:g}% on ratio figures, beyond noise"
            if cmp.ratios_gated
            else "shown, not gated (another runner class)"
        ),
        _table(["case", "figure", "old", "new", "change", "noise", "verdict"], rows),
    ]
    if hidden:
        out.append(f"{hidden} absolute figures (median time, peak memory) within noise, not listed")
    out += cmp.notes
    counts = {v: sum(r.verdict == v for r in ratio_rows) for v in ("improved", "regressed", "within noise")}
    out.append(
        f"ratio figures: {counts['improved']} improved, {counts['regressed']} regressed, "
        f"{counts['within noise']} within noise"
    )
    suites = set(new["suites"])
    other = [c for c in cmp.missing_cases if c.split("/")[0] not in suites]
    missing = [c for c in cmp.missing_cases if c.split("/")[0] in suites]
    if other:
        out.append(
            f"not compared: {len(other)} baseline cases of suites this run did not include "
            f"({', '.join(sorted({c.split('/')[0] for c in other}))})"
        )
    if missing:
        out.append(f"missing from this run ({len(missing)}, not a failure): " + ", ".join(_short(c) for c in missing))
    if cmp.new_cases:
        out.append(f"new in this run ({len(cmp.new_cases)}): " + ", ".join(_short(c) for c in cmp.new_cases))
    fails = cmp.failures
    out.append(
        f"gate: FAIL ({len(fails)} figures regressed past {cmp.threshold * 100:g}%: "
        + ", ".join(f"{_short(r.case)} {r.figure}" for r in fails)
        + ")"
        if fails
        else "gate: pass"
        if cmp.ratios_gated
        else f"gate: not applied (the baseline is of {machine(old)}, this run of {machine(new)})"
    )
    return "\n".join(out)
