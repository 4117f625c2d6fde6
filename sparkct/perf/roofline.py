"""The roofline of a `sparkct bench` result: each case that knows its FLOPs (and bytes) against the
device's compute and bandwidth peaks.

Per case with "flops" and a median time:
  achieved GFLOP/s    flops / median seconds
  arithmetic intensity  flops / bytes (FLOP per byte; needs "bytes")
  roof                min(compute peak of the case's dtype, intensity x bandwidth peak); without bytes
                      the compute peak (an upper bound: the case is drawn nowhere, listed in the table)
  of roof, of peak    achieved / roof, achieved / compute peak
  bound               "memory" left of the ridge point (peak / bandwidth), "compute" right of it

Peaks come from the result's "peaks" (stored by `sparkct bench`, see sparkct.perf.peaks), else, for
a GPU the table knows, from the table by the result's GPU name; a CPU result without stored peaks
needs them measured (`calibrate=True`: on *this* machine, so only meaningful where it ran).

    from sparkct.perf import roofline
    png, md = roofline.write(result, "out/")          # result: the bench JSON as a dict
    python -m sparkct.perf.roofline benchmarks/baselines/cpu-2core.json --out out/
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from sparkct.errors import UserError
from sparkct.io import atomic_path, read_json, write_text_atomic
from sparkct.perf import peaks as P
from sparkct.perf.peaks import compute_peak

__all__ = ["resolve_peaks", "case_dtype", "points", "markdown", "plot", "write", "main"]


def _gpu_name(result: dict) -> str | None:
    env = result.get("environment") or {}
    for k in ("gpu_name", "gpu", "cuda_device", "device_name"):
        v = env.get(k)
        if isinstance(v, str) and v:
            return v
    return None


def resolve_peaks(result: dict, peaks: dict | None = None, *, calibrate: bool = False) -> dict:
    """The peaks to draw `result` against: `peaks` if given, the result's stored "peaks", the GPU
    table by the result's GPU name, or (calibrate=True) measured now on this machine."""
    if peaks is not None:
        return peaks
    if result.get("peaks"):
        return result["peaks"]
    device = result.get("device", "cpu")
    if device == "cuda":
        name = _gpu_name(result)
        table = P.gpu_table_peaks(name) if name else None
        if table is not None:
            return table
        if not calibrate:
            raise UserError(
                f"no peaks for GPU {name or '(unnamed)'}: the result stores none and "
                f"sparkct.perf.peaks.GPU_PEAKS does not know it; rerun the bench with peaks "
                f"or calibrate on that GPU"
            )
        return P.gpu_peaks("cuda")
    if not calibrate:
        raise UserError(
            "the CPU result stores no measured peaks ('peaks'); rerun the bench, or "
            "calibrate on this machine (--calibrate: only meaningful where the bench ran)"
        )
    return P.cpu_peaks()


def case_dtype(case: dict) -> str:
    params = case.get("params") or {}
    return str(params.get("dtype", "float32"))


def _median(case: dict) -> float | None:
    t = case.get("time_s") or {}
    m = t.get("median") if isinstance(t, dict) else None
    return float(m) if m else None


def points(result: dict, peaks: dict) -> list[dict]:
    """One row per case with flops and a median time (see the module doc for the columns)."""
    bw = peaks.get("bandwidth_gb_s")
    tf32 = bool((result.get("environment") or {}).get("allow_tf32"))
    rows = []
    for case in result.get("cases", []):
        flops, med = case.get("flops"), _median(case)
        if not flops or not med:
            continue
        params = case.get("params") or {}
        peak, roof_dtype = compute_peak(peaks, case_dtype(case), tf32=tf32 or bool(params.get("tf32")))
        achieved = flops / med / 1e9
        row = {
            "id": case["id"],
            "group": case.get("group"),
            "label": label(case),
            "dtype": roof_dtype,
            "flops": flops,
            "bytes": case.get("bytes"),
            "median_s": med,
            "achieved_gflop_s": achieved,
            "peak_gflop_s": peak,
            "intensity": None,
            "roof_gflop_s": peak,
            "bound": None,
            "of_roof": None,
            "of_peak": achieved / peak if peak else None,
        }
        if case.get("bytes") and bw and peak:
            ai = flops / case["bytes"]
            row["intensity"] = ai
            row["roof_gflop_s"] = min(peak, ai * bw)
            row["bound"] = "memory" if ai * bw < peak else "compute"
            row["achieved_gb_s"] = case["bytes"] / med / 1e9
            row["of_roof"] = achieved / row["roof_gflop_s"]
        rows.append(row)
    return rows


def label(case: dict) -> str:
    """A short name for a case: the test's parameter id (or its test name), without the device."""
    cid = case["id"]
    name = cid.rsplit("/", 1)[-1]
    if "[" in name:
        test, param = name.split("[", 1)
        param = param.rstrip("]")
        parts = [p for p in param.split("-") if p not in ("cpu", "cuda")]
        return f"{test.removeprefix('test_')}[{'-'.join(parts)}]"
    return name.removeprefix("test_")


def fmt(x, digits: int = 3) -> str:
    """Numbers for tables: `digits` significant digits, thousands separated, no exponent below 1e9."""
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if x == 0 or not math.isfinite(x):
        return str(x)
    mag = math.floor(math.log10(abs(x)))
    dec = max(0, digits - 1 - mag)
    return f"{x:,.{dec}f}"


def peaks_line(peaks: dict) -> str:
    by = peaks.get("compute_by_dtype_gflop_s") or {}
    comp = ", ".join(f"{k} {fmt(v)}" for k, v in by.items() if v) or "unknown"
    what = peaks.get("name") or peaks.get("device", "?")
    if peaks.get("threads"):
        what += f", {peaks['threads']} threads"
    return (
        f"{what}: compute {comp} GFLOP/s, bandwidth {fmt(peaks.get('bandwidth_gb_s'))} GB/s "
        f"({peaks.get('source', '?')})"
    )


def markdown(rows: list[dict], peaks: dict) -> str:
    """The roofline table (markdown): one row per case."""
    out = [
        f"Peaks: {peaks_line(peaks)}.",
        "",
        "| # | case | dtype | GFLOP | FLOP/byte | achieved GFLOP/s | roof GFLOP/s | bound | of roof | of peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        out.append(
            f"| {i} | {r['label']} | {r['dtype']} | {fmt(r['flops'] / 1e9)} | {fmt(r['intensity'])} | "
            f"{fmt(r['achieved_gflop_s'])} | {fmt(r['roof_gflop_s'])} | {r['bound'] or '—'} | "
            f"{_pct(r['of_roof'])} | {_pct(r['of_peak'])} |"
        )
    if any(r["intensity"] is None for r in rows):
        out += ["", "Cases without a byte count have no intensity: their roof is the compute peak."]
    if any((r["of_peak"] or 0) > 1 for r in rows):
        # Seen on the 2-core EPYC: oneDNN's 3x3 convolutions at 2x the GEMM-measured peak.
        out += [
            "",
            "Above 100 %: the FLOPs are counted as the direct algorithm does them (a convolution: "
            "2·9·C_in·C_out per output pixel); a library that computes it with fewer operations "
            "(e.g. Winograd or FFT convolution) reaches an effective rate above the measured GEMM "
            "peak. Read those rows as effective rates, comparable with each other, not with the roof.",
        ]
    return "\n".join(out) + "\n"


def _pct(x) -> str:
    return "—" if x is None else f"{x:.0%}" if x >= 0.1 else f"{x:.1%}"


def plot(rows: list[dict], peaks: dict, path: str, title: str | None = None) -> str:
    """A log-log roofline PNG: the bandwidth slope and the compute roof of each dtype the cases use,
    one numbered, labelled point per case with an intensity."""
    import matplotlib  # noqa: PLC0415 (lazy: optional dependency)

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # noqa: PLC0415 (lazy: optional dependency)

    bw = peaks.get("bandwidth_gb_s")
    drawn = [r for r in rows if r["intensity"]]
    fig, ax = plt.subplots(figsize=(11, 6), dpi=120)
    ais = [r["intensity"] for r in drawn] or [1.0]
    dtypes = sorted({r["dtype"].split(" ")[0] for r in rows} or {"fp32"})
    roofs = {d: compute_peak(peaks, d)[0] for d in dtypes}
    ridge_max = max((p / bw for p in roofs.values() if p and bw), default=1.0)
    lo = min(min(ais), ridge_max) / 8
    hi = max(max(ais), ridge_max) * 8
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, d in enumerate(dtypes):
        peak = roofs[d]
        if not peak or not bw:
            continue
        xs = [lo, peak / bw, hi]
        ax.plot(
            xs,
            [min(peak, x * bw) for x in xs],
            color=colors[j % len(colors)],
            lw=2,
            label=f"{d} roof: {fmt(peak)} GFLOP/s, {fmt(bw)} GB/s (ridge {fmt(peak / bw)} FLOP/B)",
        )
    for i, r in enumerate(rows, 1):
        if not r["intensity"]:
            continue
        ax.scatter([r["intensity"]], [r["achieved_gflop_s"]], s=22, color="black", zorder=3)
        # numbers at the points (clustered cases stay readable), names in the key beside the axes
        ax.annotate(
            str(i),
            (r["intensity"], r["achieved_gflop_s"]),
            fontsize=7,
            xytext=(4, 2 + 6 * (i % 3) - 6),
            textcoords="offset points",
        )
    key = [f"{i}  {r['label']}" for i, r in enumerate(rows, 1) if r["intensity"]]
    fig.text(0.74, 0.9, "\n".join(key), fontsize=6, va="top", ha="left", family="monospace")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ys = [r["achieved_gflop_s"] for r in drawn] + [p for p in roofs.values() if p]
    ax.set_ylim(min(ys) / 10 if ys else 0.1, max(ys) * 3 if ys else 10)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("GFLOP/s")
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or f"roofline: {peaks_line(peaks)}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.73, 1))
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _runner(result: dict) -> str:
    return str(result.get("runner") or result.get("device") or "bench")


def write(result: dict, out_dir: str, peaks: dict | None = None, *, calibrate: bool = False) -> tuple[str, str]:
    """Write roofline-<runner>.png and roofline-<runner>.md for a bench result into out_dir;
    returns their paths. Raises UserError when no case has FLOPs or no peaks are known."""
    pk = resolve_peaks(result, peaks, calibrate=calibrate)
    rows = points(result, pk)
    if not rows:
        raise UserError("no case in the result records its FLOPs ('flops'): nothing to draw")
    os.makedirs(out_dir, exist_ok=True)
    runner = _runner(result)
    title = f"{runner}: {peaks_line(pk)}"
    png = plot(rows, pk, os.path.join(out_dir, f"roofline-{runner}.png"), title=title)
    md_path = os.path.join(out_dir, f"roofline-{runner}.md")
    write_text_atomic(md_path, f"# Roofline, {runner}\n\n![roofline](roofline-{runner}.png)\n\n" + markdown(rows, pk))
    return png, md_path


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(
        prog="python -m sparkct.perf.roofline", description="roofline PNG + table of a `sparkct bench` JSON"
    )
    p.add_argument("result", help="a sparkct bench JSON (e.g. benchmarks/baselines/cpu-2core.json)")
    p.add_argument("--out", default=".", help="folder for roofline-<runner>.png and .md")
    p.add_argument(
        "--calibrate", action="store_true", help="measure the peaks on this machine when the result stores none"
    )
    return p


def run(args) -> int:
    if not os.path.isfile(args.result):
        raise UserError(f"no such file: {args.result}")
    png, md = write(read_json(args.result), args.out, calibrate=args.calibrate)
    print(f"wrote {png}\nwrote {md}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
