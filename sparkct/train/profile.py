"""``sparkct profile pretrain METHOD [pretrain options] --steps N``: the normal trainer under torch.profiler.

The run is ``sparkct pretrain METHOD`` with the same options, stopped after ``--steps`` optimizer steps; the
last ``steps - warmup_steps`` of them are recorded (CPU ops, and CUDA kernels on a GPU). Written to --out:

* ``trace.json``: Chrome / Perfetto trace (chrome://tracing, https://ui.perfetto.dev) with the trainer's
  phases (``step/*``), the losses (``loss/*``) and every sparkct op (``sparkct.*`` ranges around the Python
  face, ``sparkct::*`` for the kernel call itself) as named ranges;
* ``profile.md``: the top ops/kernels by self time and the sparkct ranges by total time (also printed);
* ``profile.json``: the same rows, the settings and the devices.

The training run itself (metrics, loss curve, last checkpoint) goes to OUT/run, replaced by the next
profile into OUT; the built-in synthetic data (or a DICOM/NIfTI --data) is prepared into OUT/data, which
the next profile into OUT reuses.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys

from sparkct.device import resolve_device
from sparkct.errors import UserError
from sparkct.models import METHODS
from sparkct.train.cli import pretrain_configs

_EPILOG = """examples:
  sparkct profile pretrain spark --steps 20                        # built-in synthetic CT, CPU
  sparkct profile pretrain spark --steps 20 --device cuda --batch 64 --crop 224 --out prof/spark
  sparkct profile pretrain simclr --steps 12 --warmup-steps 2 --record-shapes
run `sparkct profile pretrain METHOD -h` for every option (the pretraining ones included).
Nsight Systems / Compute and compute-sanitizer recipes: docs/profiling.md."""

_MARKER = ".sparkct-profile"

#: names of sparkct's own ranges and ops in a profile (sparkct.profiling)
RANGE_PREFIXES = ("step/", "loss/", "sparkct.", "sparkct::")


def _add_profile_args(method: str):
    def extend(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("profiling")
        g.add_argument("--steps", type=int, default=20, help="optimizer steps to run (warm-up steps included)")
        g.add_argument(
            "--warmup-steps",
            type=int,
            default=2,
            help="first steps run but not recorded (one-off costs: allocation, autotuning, the "
            "trainer's set-up, which 0 records in the first step)",
        )
        g.add_argument("--top", type=int, default=25, help="rows of the top-ops table")
        g.add_argument("--record-shapes", action="store_true", help="record input shapes (group ops by shape)")
        g.add_argument("--memory", action="store_true", help="record allocations (profile_memory)")
        g.add_argument("--with-stack", action="store_true", help="record Python stacks (larger trace)")
        for a in p._actions:  # the trainer's --out becomes the profile's folder
            if a.dest == "out":
                a.default = f"runs/profile-{method}"
                a.help = (
                    "profile folder: trace.json, profile.md, profile.json and the run (OUT/run, replaced "
                    "by the next profile); built-in data is kept in OUT/data"
                )

    return extend


def cmd_profile(args: argparse.Namespace) -> int:
    if not args.method:
        raise UserError("name a method to profile (" + ", ".join(METHODS) + ")")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "sparkct profile runs one process; under torchrun, profile with torch.profiler in your "
            "own code or use Nsight Systems (docs/profiling.md)"
        )
    given = {a.split("=", 1)[0] for a in args.rest if a.startswith("--")}
    for flag, why in (
        ("--max-steps", "use --steps"),
        ("--resume", "a profile starts a fresh run"),
        ("--force", "a profile starts a fresh run"),
    ):
        if flag in given:
            raise UserError(f"{flag} does not apply to sparkct profile ({why})")

    def check(ns):
        if ns.steps < 1:
            raise UserError(f"--steps must be >= 1, got {ns.steps}")
        if ns.warmup_steps < 0:
            raise UserError(f"--warmup-steps must be >= 0, got {ns.warmup_steps}")
        if ns.steps <= ns.warmup_steps:
            raise UserError(
                f"--steps {ns.steps} leaves no step to record after --warmup-steps {ns.warmup_steps}; "
                f"raise --steps (or lower --warmup-steps)"
            )
        if ns.top < 1:
            raise UserError(f"--top must be >= 1, got {ns.top}")

    ns, cfg, mcfg = pretrain_configs(
        args.method,
        args.rest,
        extend=_add_profile_args(args.method),
        check=check,
        prog=f"sparkct profile pretrain {args.method}",
    )
    return profile_pretrain(
        args.method,
        cfg,
        mcfg,
        steps=ns.steps,
        warmup=ns.warmup_steps,
        top=ns.top,
        record_shapes=ns.record_shapes,
        memory=ns.memory,
        with_stack=ns.with_stack,
    )


def profile_pretrain(
    method_name: str,
    cfg,
    mcfg,
    *,
    steps: int,
    warmup: int = 2,
    top: int = 25,
    record_shapes: bool = False,
    memory: bool = False,
    with_stack: bool = False,
) -> int:
    import torch  # noqa: PLC0415 (lazy: `sparkct -h` imports no torch)

    from sparkct import io as sio  # noqa: PLC0415 (lazy: `sparkct -h` imports no torch)
    from sparkct.data import resolve_data  # noqa: PLC0415 (lazy: `sparkct -h` imports no torch)
    from sparkct.train.trainer import Trainer, build_method, rank0_log  # noqa: PLC0415 (lazy: `sparkct -h` imports no torch)

    out = cfg.out
    os.makedirs(out, exist_ok=True)
    device = resolve_device(cfg.device)
    run_dir = os.path.join(out, "run")
    marker = os.path.join(run_dir, _MARKER)
    if os.path.exists(run_dir):
        if not os.path.isfile(marker):
            raise UserError(f"{run_dir} exists and was not made by sparkct profile; choose another --out")
        shutil.rmtree(run_dir)
    # in OUT/data, beside OUT/run: it outlives the run, which the next profile replaces
    data = resolve_data(
        cfg.data,
        cfg.out,
        synth_patients=cfg.synth_patients,
        synth_size=cfg.synth_size,
        synth_slices=cfg.synth_slices,
        log=rank0_log,
    )
    os.makedirs(run_dir)
    sio.write_text_atomic(marker, "a sparkct profile run: the next profile into this folder replaces it\n")
    cfg = dataclasses.replace(
        cfg, data=data, out=run_dir, max_steps=steps, ckpt_every=steps + 1, preview_every=0, tensorboard=False
    )
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    trace = os.path.join(out, "trace.json")
    recorded = {}

    def ready(prof):
        with sio.atomic_path(trace, ".json") as tmp:
            prof.export_chrome_trace(tmp)
        recorded["events"] = prof.key_averages()

    prof = torch.profiler.profile(
        activities=acts,
        schedule=torch.profiler.schedule(wait=0, warmup=warmup, active=steps - warmup, repeat=1),
        on_trace_ready=ready,
        record_shapes=record_shapes,
        profile_memory=memory,
        with_stack=with_stack,
    )
    method = build_method(method_name, cfg, mcfg)
    with prof:
        summary = Trainer(method, cfg, method_name=method_name, on_step=lambda s: prof.step()).fit()
    if "events" not in recorded:  # the trainer stopped early (it raises otherwise)
        raise RuntimeError("the profiler recorded no step")
    report = summarize(recorded["events"], cuda=device.type == "cuda", top=top)
    report.update(
        method=method_name,
        device=str(device),
        steps=steps,
        warmup_steps=warmup,
        recorded_steps=steps - warmup,
        batch=cfg.batch,
        crop=cfg.crop,
        arch=cfg.arch,
        images_per_s=summary.get("images_per_s"),
        torch=torch.__version__,
        trace=trace,
    )
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    md = markdown(report)
    sio.write_text_atomic(os.path.join(out, "profile.md"), md)
    sio.write_json_atomic(os.path.join(out, "profile.json"), report)
    print(md)
    print(
        f"wrote {trace} (open in https://ui.perfetto.dev or chrome://tracing), "
        f"{os.path.join(out, 'profile.md')}, {os.path.join(out, 'profile.json')}",
        file=sys.stderr,
    )
    return 0


def _ms(us: float) -> float:
    return round(us / 1000.0, 4)


def summarize(events, *, cuda: bool, top: int) -> dict:
    """Rows of the top ops by self time (device time on CUDA) and of sparkct's ranges by total time, from
    torch.profiler's key_averages(). Times in ms over the recorded steps."""
    steps = [e for e in events if e.key.startswith("ProfilerStep")]
    n_steps = sum(e.count for e in steps)
    wall = sum(e.cpu_time_total for e in steps)  # µs, the recorded steps' CPU-side wall time
    self_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = [e for e in events if not e.key.startswith("ProfilerStep")]
    total_self = sum(max(getattr(e, self_key), 0) for e in ops) or 1.0
    rows = []
    for e in sorted(ops, key=lambda e: getattr(e, self_key), reverse=True)[:top]:
        r = {
            "name": e.key,
            "calls": e.count,
            "self_ms": _ms(getattr(e, self_key)),
            "self_pct": round(100.0 * getattr(e, self_key) / total_self, 2),
            "total_ms": _ms(e.cpu_time_total),
        }
        if cuda:
            r["self_cpu_ms"] = _ms(e.self_cpu_time_total)
            r["device_total_ms"] = _ms(e.device_time_total)
        rows.append(r)
    phase_order = {name: i for i, name in enumerate(_phase_names())}
    ranges = [e for e in events if e.key.startswith(RANGE_PREFIXES)]
    ranges.sort(key=lambda e: (0 if e.key in phase_order else 1, phase_order.get(e.key, 0), -e.cpu_time_total))
    rrows = []
    for e in ranges:
        r = {
            "name": e.key,
            "calls": e.count,
            "total_ms": _ms(e.cpu_time_total),
            "per_step_ms": _ms(e.cpu_time_total / max(n_steps, 1)),
            "pct_of_step": round(100.0 * e.cpu_time_total / wall, 2) if wall else None,
        }
        if cuda:
            r["device_total_ms"] = _ms(e.device_time_total)
        rrows.append(r)
    return {"recorded": {"steps": n_steps, "wall_ms": _ms(wall)}, "sort": self_key, "top": rows, "ranges": rrows}


def _phase_names() -> tuple[str, ...]:
    from sparkct.profiling import PHASES  # noqa: PLC0415 (lazy: the parser imports no torch)

    return PHASES


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(t for _, t in cols) + " |"
    sep = "|" + "|".join("---" if k == "name" else "---:" for k, _ in cols) + "|"
    body = []
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            if k == "name":
                v = "`" + str(v).replace("|", "\\|")[:90] + "`"
            elif v is None:
                v = ""
            elif isinstance(v, float):
                v = f"{v:.3f}"
            cells.append(str(v))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep] + body)


def markdown(report: dict) -> str:
    cuda = report["sort"] == "self_device_time_total"
    rec = report["recorded"]
    lines = [
        f"# Profile: sparkct pretrain {report['method']}",
        "",
        f"{report.get('arch')} · batch {report.get('batch')} · crop {report.get('crop')} · "
        f"{report.get('gpu', report.get('device'))} · torch {report.get('torch')} · "
        f"{rec['steps']} recorded steps (after {report.get('warmup_steps')} warm-up), "
        f"{rec['wall_ms']:.1f} ms CPU-side wall time · trace: {report.get('trace')}",
        "",
        f"## Top ops and kernels by self {'CUDA' if cuda else 'CPU'} time",
        "",
    ]
    cols = [
        ("name", "name"),
        ("calls", "calls"),
        ("self_ms", "self ms"),
        ("self_pct", "self %"),
        ("total_ms", "CPU total ms"),
    ]
    if cuda:
        cols[3:3] = [("self_cpu_ms", "self CPU ms")]
    lines += [
        _table(report["top"], cols),
        "",
        "## sparkct ranges: trainer phases (step/*), losses (loss/*), ops (sparkct.*, sparkct::*)",
        "",
        "Total (inclusive) CPU-side time; a phase's CPU time includes waiting for the device where it "
        "synchronizes (step/sync-loss reads the loss).",
        "",
    ]
    rcols = [
        ("name", "name"),
        ("calls", "calls"),
        ("total_ms", "total ms"),
        ("per_step_ms", "ms / step"),
        ("pct_of_step", "% of step"),
    ]
    if cuda:
        rcols.append(("device_total_ms", "CUDA ms"))
    lines += [_table(report["ranges"], rcols), ""]
    return "\n".join(lines)


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "profile",
        help="profile a short pretraining run with torch.profiler (trace + top-ops table)",
        description="Run a command under torch.profiler for a few steps and write a Chrome/Perfetto trace and a "
        "table of the top ops and kernels, with sparkct's ops and the trainer's phases as named ranges.",
        epilog=_EPILOG,
    )
    sub = s.add_subparsers(dest="profile_target", required=True, metavar="TARGET")
    t = sub.add_parser(
        "pretrain",
        help="sparkct pretrain METHOD ... under the profiler",
        description="Profile `sparkct pretrain METHOD` (same options) for --steps steps.",
        epilog=_EPILOG,
    )
    t.add_argument("method", nargs="?", help="the method (sparkct pretrain --list)")
    t.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        help="--steps, --warmup-steps, --out, ... and the method's options (sparkct profile pretrain METHOD -h)",
    )
    t.set_defaults(func=cmd_profile)
