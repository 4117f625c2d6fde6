"""``sparkct data ...``: synth, prepare, info, show, read.

Each command checks its arguments before it reads or writes anything; a mistake raises
:class:`sparkct.errors.UserError`, which ``sparkct`` prints in one line (exit status 2).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import sys
from collections import Counter

from sparkct.cliargs import add_dataclass_args, dataclass_from_args, output_file
from sparkct.errors import UserError

from .options import PrepareOptions, SynthOptions


class _TqdmHandler(logging.Handler):
    """Log lines that do not break tqdm's progress bars."""

    def emit(self, record):
        try:
            from tqdm import tqdm  # noqa: PLC0415 (lazy: only when logging, not for `sparkct -h`)

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _setup_logging(quiet: bool, debug: bool = False) -> None:
    log = logging.getLogger("sparkct.data")
    if not any(isinstance(h, _TqdmHandler) for h in log.handlers):
        h = _TqdmHandler()
        h.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(h)
        log.propagate = False
    log.setLevel(logging.ERROR if quiet else logging.DEBUG if debug else logging.INFO)


def _cache(path: str):
    from .cache import SliceCache  # noqa: PLC0415 (lazy: `sparkct -h` imports no numpy)

    return SliceCache(path)


def cmd_synth(args) -> int:
    from .synthetic import _check_synth_args, synth  # noqa: PLC0415 (lazy: `sparkct -h` imports no numpy)

    o = dataclass_from_args(SynthOptions, args)
    series = (o.min_series, o.max_series)
    _check_synth_args(args.dst, o.patients, o.size, o.thickness, series, o.p_finding, o.slices)
    _setup_logging(args.quiet)
    rep = synth(
        args.dst,
        patients=o.patients,
        seed=o.seed,
        size=o.size,
        thickness=o.thickness,
        series_per_patient=series,
        p_finding=o.p_finding,
        localizer=o.localizer,
        progress=not args.quiet,
        slices=o.slices,
    )
    print(rep.summary())
    return 0


def cmd_prepare(args) -> int:
    from .dicom import PixelLimits  # noqa: PLC0415 (lazy: `sparkct -h` imports no numpy)
    from .preparing import prepare  # noqa: PLC0415 (lazy: `sparkct -h` imports no numpy)

    kw = dataclasses.asdict(dataclass_from_args(PrepareOptions, args))
    limits = PixelLimits(kw.pop("max_slice_pixels"), kw.pop("max_file_pixels"))
    _setup_logging(args.quiet, args.debug)
    try:
        rep = prepare(args.src, args.dst, progress=not args.quiet, limits=limits, **kw)
    except KeyboardInterrupt:
        print("interrupted: what was written is kept; run the same command again to resume", file=sys.stderr)
        return 130
    print(rep.summary())
    return 0 if rep.series_failed == 0 else 1


def cmd_info(args) -> int:
    import numpy as np  # noqa: PLC0415 (lazy: `sparkct -h` imports no numpy)

    if args.csv:
        output_file(args.csv, "--csv")
    c = _cache(args.cache)
    if args.verify:
        from .cache import verify_index  # noqa: PLC0415

        verify_index(os.path.join(args.cache, "index.npz"))
    s = c.series
    print(f"cache      {args.cache}")
    if args.verify:
        print("verified   index.npz: every table's CRC")
    print(f"settings   {c.manifest['settings']}")
    print(f"slices     {len(c)} in {c.n_series} series of {len(c.patients)} patients")
    if c.n_series:
        shapes = {tuple(int(v) for v in x) for x in s["shape"]}
        print(f"shapes     {sorted(shapes)[:6]}{' ...' if len(shapes) > 6 else ''}")
        sp = s["spacing"]
        with np.errstate(all="ignore"):
            print(
                f"spacing    slice {np.nanmin(sp[:, 0]):.3g}-{np.nanmax(sp[:, 0]):.3g} mm, "
                f"in-plane {np.nanmin(sp[:, 1]):.3g}-{np.nanmax(sp[:, 1]):.3g} mm"
            )
        sexes = {str(k) or "?": int(v) for k, v in zip(*np.unique(s["patient_sex"], return_counts=True))}
        print(f"sex        {sexes}")
        ages = s["age_years"][np.isfinite(s["age_years"])]
        if len(ages):
            print(f"age        {ages.min():.0f}-{ages.max():.0f} years (median {np.median(ages):.0f})")
        kvp = s["kvp"][np.isfinite(s["kvp"])]
        if len(kvp):
            print(f"kVp        {sorted({int(v) for v in kvp})}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["slice", "series_uid", "patient", "slice_index", "z_mm", "instance_number"])
            for i in range(len(c)):
                si = int(c.slice_series[i])
                w.writerow(
                    [
                        i,
                        s["series_uid"][si],
                        c.patients[c.slice_patient[i]],
                        int(c.slice_index[i]),
                        f"{c.slice_z[i]:.4f}",
                        int(c.slice_instance[i]),
                    ]
                )
        print(f"wrote {args.csv}")
    return 0


def _window_names(spec: str) -> list[tuple[str, float, float]]:
    from .windows import resolve_windows  # noqa: PLC0415 (lazy: `sparkct -h` imports no numpy)

    names = [w.strip() for w in spec.split(",") if w.strip()]
    try:
        ws = resolve_windows(names)
    except ValueError as e:
        raise UserError(f"--windows: {e}") from None
    return [(n, c, w) for n, (c, w) in zip(names, ws)]


def contact_sheet(cache, indices, windows: list[tuple[str, float, float]], tile: int = 256):
    """A PIL image: one row per slice of `indices`, one greyscale tile per window (name, center,
    width), each captioned with its series, slice and window."""
    import numpy as np  # noqa: PLC0415 (lazy: `sparkct -h` imports no numpy)
    from PIL import Image, ImageDraw, ImageFont  # noqa: PLC0415 (lazy: PIL loads when a command runs)

    from .windows import apply_windows  # noqa: PLC0415 (lazy: `sparkct -h` imports no numpy)

    font_px = max(9, min(16, tile // 18))
    try:
        font = ImageFont.load_default(size=font_px)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    line = font_px + 3
    cap = 2 * line + 4
    sheet = Image.new("L", (len(windows) * tile, len(indices) * (tile + cap)), color=0)
    short = tile < 160  # captions are clipped to their tile: shorter words for small tiles
    for r, i in enumerate(indices):
        s = int(cache.slice_series[i])
        k, n = int(cache.slice_index[i]), int(cache.series["n"][s])
        hu = cache[i]
        y = r * (tile + cap)
        for c, (name, center, width) in enumerate(windows):
            g = apply_windows(hu, [(center, width)])[0]  # (H, W) in [0, 1]
            img = Image.fromarray(np.rint(g * 255).astype(np.uint8), mode="L").resize((tile, tile), Image.BILINEAR)
            label = Image.new("L", (tile, cap), color=0)
            draw = ImageDraw.Draw(label)
            draw.text((3, 2), f"s{s} {k + 1}/{n}" if short else f"series {s}  slice {k + 1}/{n}", fill=255, font=font)
            draw.text((3, 2 + line), name if short else f"{name} (C {center:g}, W {width:g})", fill=200, font=font)
            if c:
                draw.line([(0, 0), (0, cap - 1)], fill=90)
            x = c * tile
            sheet.paste(label, (x, y))
            sheet.paste(img, (x, y + cap))
    return sheet


def cmd_show(args) -> int:
    import numpy as np  # noqa: PLC0415 (lazy: `sparkct -h` imports no numpy)
    from PIL import Image  # noqa: PLC0415 (lazy: PIL loads when a command runs)

    ext = os.path.splitext(args.out)[1].lower()
    if ext not in Image.registered_extensions():
        raise UserError(f"--out {args.out!r}: not an image file name (.png, .jpg, ...)")
    output_file(args.out, "--out")
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if not 16 <= args.tile <= 2048:
        raise UserError(f"--tile must be in [16, 2048] pixels, got {args.tile}")
    windows = _window_names(args.windows)
    c = _cache(args.cache)
    if len(c) == 0:
        raise UserError(f"the cache {args.cache!r} holds no slices")
    rng = np.random.default_rng(args.seed)
    idx = np.sort(rng.choice(len(c), size=min(args.n, len(c)), replace=False))
    contact_sheet(c, idx, windows, args.tile).save(args.out)
    print(f"wrote {args.out} ({len(idx)} slices x {len(windows)} windows)")
    return 0


def cmd_read(args) -> int:
    import numpy as np  # noqa: PLC0415 (lazy: `sparkct -h` imports no numpy)

    from .nifti import is_nifti, read_nifti  # noqa: PLC0415 (lazy: `sparkct -h` imports no numpy)

    if not os.path.exists(args.path):
        raise FileNotFoundError(f"no such file or folder: {args.path!r}")
    if is_nifti(args.path):
        vols = [read_nifti(args.path)]
    else:
        from .dicom import iter_series  # noqa: PLC0415 (lazy: `sparkct -h` imports no numpy)

        vols = list(iter_series(args.path))
    if not vols:
        print("no CT series found", file=sys.stderr)
        return 1
    for v in vols:
        m = v.meta
        print(
            f"series {m.get('series_uid') or '-'}: {v.shape[0]} slices of {v.shape[1]}x{v.shape[2]}, "
            f"spacing {tuple(round(float(x), 4) for x in v.spacing)} mm, sorted by {m.get('sorted_by')}, "
            f"kVp {m.get('kvp')}, HU {np.min(v.hu):.0f}..{np.max(v.hu):.0f} (mean {np.mean(v.hu):.0f})"
        )
        if v.skipped:
            print("  skipped: " + ", ".join(f"{r} {n}" for r, n in Counter(r for _, r in v.skipped).items()))
    return 0


def register(subparsers) -> None:
    # No torch, pydicom or numpy here: `sparkct -h` must stay instant.
    p = subparsers.add_parser(
        "data",
        help="CT data: synthetic DICOM, the prepared slice cache, inspection",
        description="CT data: write synthetic chest CT (synth), turn DICOM/NIfTI into a slice cache "
        "(prepare), and look at caches (info, show) and series (read).",
    )
    sub = p.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "synth",
        help="write synthetic chest CT DICOM series with labelled nodules",
        description="Write procedurally generated chest CT as real DICOM (one file per "
        "slice), with per-series and per-slice nodule labels (CSV).",
    )
    s.add_argument("dst", help="output folder (dicom/, labels.csv, slice_labels.csv, nodules.csv)")
    add_dataclass_args(s, SynthOptions)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser(
        "prepare",
        help="DICOM/NIfTI tree -> int16 HU slice cache (resumable)",
        description="Turn every CT series under SRC into the memory-mapped int16 HU slice "
        "cache DST. Resumable: run it again after an interruption; an unchanged "
        "source is not read again. Files that cannot be used are skipped and "
        "counted by reason (DST/report.json, DST/skipped.csv).",
    )
    s.add_argument("src", help="folder of DICOM files and/or NIfTI volumes (searched recursively)")
    s.add_argument("dst", help="cache folder (created; may sit inside SRC)")
    add_dataclass_args(s, PrepareOptions)
    s.add_argument("-q", "--quiet", action="store_true", help="errors only, no progress bar")
    s.add_argument(
        "-v",
        "--verbose",
        dest="debug",
        action="store_true",
        help="debug log with tracebacks of failed series (these may quote header values)",
    )
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser(
        "info",
        help="summary of a prepared cache",
        description="Slices, series, patients, shapes, spacings, sex, age and kVp of a cache.",
    )
    s.add_argument("cache", help="a folder written by `sparkct data prepare`")
    s.add_argument("--csv", default=None, help="also write one row per slice to this CSV")
    s.add_argument(
        "--verify",
        action="store_true",
        help="also read the whole index and check its CRCs (opening a cache maps the index without reading it)",
    )
    s.set_defaults(func=cmd_info)

    s = sub.add_parser(
        "show",
        help="a contact sheet of random slices (PNG), one greyscale tile per window",
        description="Random slices of a cache, one row per slice and one greyscale tile per "
        "HU window, each captioned with its series, slice and window.",
    )
    s.add_argument("cache", help="a folder written by `sparkct data prepare`")
    s.add_argument("--out", default="slices.png", help="image file to write (its folder must exist)")
    s.add_argument("--n", type=int, default=8, help="number of slices (rows)")
    s.add_argument("--tile", type=int, default=256, help="tile size in pixels (16-2048)")
    s.add_argument(
        "--windows",
        default="lung,mediastinum,bone",
        help="comma-separated HU windows: presets lung, mediastinum, abdomen, bone, brain, or C/W "
        "(e.g. lung,40/400; a negative center as --windows=-600/1500)",
    )
    s.add_argument("--seed", type=int, default=0, help="which slices are drawn")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser(
        "read",
        help="read DICOM series (a folder) or a NIfTI file and describe them",
        description="Read every CT series under PATH (or one NIfTI file) into HU and print "
        "its size, spacing, order, kVp, HU range and skipped files.",
    )
    s.add_argument("path", help="a DICOM file or folder, or a .nii/.nii.gz file")
    s.set_defaults(func=cmd_read)
