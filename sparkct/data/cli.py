"""``sparkct data ...``: synth, prepare, info, show, read."""
from __future__ import annotations

import logging
import sys


class _TqdmHandler(logging.Handler):
    """Log lines that do not break tqdm's progress bars."""

    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _setup_logging(quiet: bool, verbose: bool = False) -> None:
    log = logging.getLogger("sparkct.data")
    if not any(isinstance(h, _TqdmHandler) for h in log.handlers):
        h = _TqdmHandler()
        h.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(h)
        log.propagate = False
    log.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)


def cmd_synth(args) -> int:
    from .synthetic import synth

    _setup_logging(args.quiet)
    rep = synth(args.dst, patients=args.patients, seed=args.seed, size=args.size, thickness=args.thickness,
                series_per_patient=(args.min_series, args.max_series), p_finding=args.p_finding,
                localizer=not args.no_localizer, progress=not args.quiet, slices=args.slices)
    print(rep.summary())
    return 0


def cmd_prepare(args) -> int:
    from .cache import CacheSettingsError, prepare

    _setup_logging(args.quiet, args.verbose)
    try:
        rep = prepare(args.src, args.dst, spacing=args.spacing, size=args.size, clip_min=args.clip_min,
                      clip_max=args.clip_max, order=args.order, antialias=not args.no_antialias,
                      workers=args.jobs, device=args.device, progress=not args.quiet, reset=args.reset,
                      show_paths=args.show_paths, patient_from=args.patient_from)
    except (CacheSettingsError, FileNotFoundError, ValueError) as e:
        print(f"sparkct data prepare: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: what was written is kept; run the same command again to resume", file=sys.stderr)
        return 130
    print(rep.summary())
    return 0 if rep.series_failed == 0 else 1


def cmd_info(args) -> int:
    import numpy as np

    from .cache import SliceCache

    c = SliceCache(args.cache)
    s = c.series
    print(f"cache      {args.cache}")
    print(f"settings   {c.manifest['settings']}")
    print(f"slices     {len(c)} in {c.n_series} series of {len(c.patients)} patients")
    if c.n_series:
        shapes = {tuple(int(v) for v in x) for x in s["shape"]}
        print(f"shapes     {sorted(shapes)[:6]}{' ...' if len(shapes) > 6 else ''}")
        sp = s["spacing"]
        with np.errstate(all="ignore"):
            print(f"spacing    slice {np.nanmin(sp[:, 0]):.3g}-{np.nanmax(sp[:, 0]):.3g} mm, "
                  f"in-plane {np.nanmin(sp[:, 1]):.3g}-{np.nanmax(sp[:, 1]):.3g} mm")
        sexes = {str(k) or "?": int(v) for k, v in zip(*np.unique(s["patient_sex"], return_counts=True))}
        print(f"sex        {sexes}")
        ages = s["age_years"][np.isfinite(s["age_years"])]
        if len(ages):
            print(f"age        {ages.min():.0f}-{ages.max():.0f} years (median {np.median(ages):.0f})")
        kvp = s["kvp"][np.isfinite(s["kvp"])]
        if len(kvp):
            print(f"kVp        {sorted({int(v) for v in kvp})}")
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["slice", "series_uid", "patient", "slice_index", "z_mm", "instance_number"])
            for i in range(len(c)):
                si = int(c.slice_series[i])
                w.writerow([i, s["series_uid"][si], c.patients[c.slice_patient[i]], int(c.slice_index[i]),
                            f"{c.slice_z[i]:.4f}", int(c.slice_instance[i])])
        print(f"wrote {args.csv}")
    return 0


def cmd_show(args) -> int:
    import numpy as np
    from PIL import Image

    from .cache import SliceCache
    from .windows import apply_windows

    c = SliceCache(args.cache)
    if len(c) == 0:
        print("empty cache", file=sys.stderr)
        return 1
    rng = np.random.default_rng(args.seed)
    idx = np.sort(rng.choice(len(c), size=min(args.n, len(c)), replace=False))
    tiles = []
    for i in idx:
        w = apply_windows(c[i], args.windows)  # (C, H, W)
        img = (w[:3] if w.shape[0] >= 3 else np.repeat(w[:1], 3, 0)).transpose(1, 2, 0)
        tiles.append(Image.fromarray((img * 255).astype(np.uint8)).resize((args.tile, args.tile)))
    cols = int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / cols))
    sheet = Image.new("RGB", (cols * args.tile, rows * args.tile))
    for k, t in enumerate(tiles):
        sheet.paste(t, ((k % cols) * args.tile, (k // cols) * args.tile))
    sheet.save(args.out)
    print(f"wrote {args.out} ({len(tiles)} slices)")
    return 0


def cmd_read(args) -> int:
    import numpy as np

    from .nifti import is_nifti, read_nifti

    if is_nifti(args.path):
        vols = [read_nifti(args.path)]
    else:
        from .dicom import iter_series
        vols = list(iter_series(args.path))
    if not vols:
        print("no CT series found", file=sys.stderr)
        return 1
    for v in vols:
        m = v.meta
        print(f"series {m.get('series_uid') or '-'}: {v.shape[0]} slices of {v.shape[1]}x{v.shape[2]}, "
              f"spacing {tuple(round(float(x), 4) for x in v.spacing)} mm, sorted by {m.get('sorted_by')}, "
              f"kVp {m.get('kvp')}, HU {np.min(v.hu):.0f}..{np.max(v.hu):.0f} (mean {np.mean(v.hu):.0f})")
        if v.skipped:
            from collections import Counter
            print("  skipped: " + ", ".join(f"{r} {n}" for r, n in Counter(r for _, r in v.skipped).items()))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="CT data: synth, prepare, info, show, read",
                              description="CT data: synthetic DICOM, the prepared slice cache, inspection")
    sub = p.add_subparsers(dest="data_command", required=True)

    s = sub.add_parser("synth", help="write synthetic chest CT DICOM series with labelled nodules")
    s.add_argument("dst")
    s.add_argument("--patients", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=256, help="rows = columns (default 256)")
    s.add_argument("--thickness", type=float, default=None, help="slice thickness = spacing, mm (default random per series)")
    s.add_argument("--slices", type=int, default=None, help="slices per series (default: the whole chest)")
    s.add_argument("--min-series", type=int, default=1)
    s.add_argument("--max-series", type=int, default=2)
    s.add_argument("--p-finding", type=float, default=0.5, help="fraction of patients with nodules")
    s.add_argument("--no-localizer", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("prepare", help="DICOM/NIfTI tree -> int16 HU slice cache (resumable)")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("-j", "--jobs", type=int, default=1, help="worker processes")
    s.add_argument("--spacing", type=float, default=None, help="target in-plane spacing (mm)")
    s.add_argument("--size", type=int, default=None, help="output rows = cols (with --spacing: crop/pad)")
    s.add_argument("--clip-min", type=int, default=-1024, help="HU floor (padding, outside the FOV)")
    s.add_argument("--clip-max", type=int, default=32767)
    s.add_argument("--order", type=int, default=1, help="interpolation order when resampling")
    s.add_argument("--no-antialias", action="store_true")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where resampling runs")
    s.add_argument("--reset", action="store_true", help="delete DST's cache and start over")
    s.add_argument("--show-paths", action="store_true",
                   help="name skipped files by path in skipped.csv and the log (default: a salted token)")
    s.add_argument("--patient-from", choices=["file", "dir"], default="file",
                   help="NIfTI: one patient per file, or per parent folder")
    s.add_argument("-q", "--quiet", action="store_true")
    s.add_argument("-v", "--verbose", action="store_true",
                   help="debug log with tracebacks of failed series (these may quote header values)")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("info", help="summary of a prepared cache")
    s.add_argument("cache")
    s.add_argument("--csv", default=None, help="also write one row per slice to this CSV")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("show", help="a contact sheet of random slices (PNG)")
    s.add_argument("cache")
    s.add_argument("--out", default="slices.png")
    s.add_argument("--n", type=int, default=16)
    s.add_argument("--tile", type=int, default=256)
    s.add_argument("--windows", default="lung,mediastinum,bone")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("read", help="read DICOM series (a folder) or a NIfTI file and describe them")
    s.add_argument("path")
    s.set_defaults(func=cmd_read)
