"""`cycleinr snli VOLUME [--axis] [--json] [--plot PNG]`: slice-wise noise level inconsistency."""

from __future__ import annotations

import argparse

from .errors import InputError
from .geometry import slice_axis
from .io import INPUT_HELP, check_output_path, read_volume, readable
from .metrics import check_noise_slices, noise_profile, significant
from .progress import Reporter


def register(commands) -> None:
    parser = commands.add_parser(
        "snli",
        help="slice-wise noise level inconsistency (SNLI) of a volume",
        description="Estimate each slice's noise level (Donoho-Johnstone wavelet estimator) and print "
        "SNLI, their standard deviation (paper eq. 10), and their mean, in image units (HU for CT).",
    )
    parser.add_argument("volume", help=INPUT_HELP)
    parser.add_argument("--axis", default="auto", choices=["auto", "0", "1", "2"],
                        help="slice axis as an image index axis (0=i, 1=j, 2=k); auto: the coarsest (k for square pixels coarser than the slices)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object, with the per-slice levels, instead of text")
    parser.add_argument("--plot", metavar="PNG", help="also draw the per-slice noise profile into this PNG file")
    parser.add_argument("--overwrite", action="store_true", help="replace the --plot file if it exists")
    parser.set_defaults(run=run, make_reporter=lambda args: Reporter(args.json, stage="snli"))


def run(args: argparse.Namespace, reporter: Reporter) -> int:
    if args.plot is not None and not args.plot.strip():
        raise InputError("--plot needs a PNG file name")
    plot = check_output_path(args.plot, args.overwrite, suffixes=(".png",)) if args.plot else None
    volume = read_volume(args.volume)
    axis = slice_axis(volume.spacing, None if args.axis == "auto" else int(args.axis))
    numpy_axis = 2 - axis  # of ITK axis `axis`
    check_noise_slices(volume.array.shape, numpy_axis, args.volume)
    profile = noise_profile(volume.array, numpy_axis)
    if plot:
        from .figures import profile_figure, save_figure  # matplotlib only when drawing

        title = f"{readable(args.volume)}: per-slice noise level along axis {axis}, SNLI {profile.snli:.3g}"
        try:
            save_figure(profile_figure({"noise level": profile.levels}, volume.spacing[axis], title), plot)
        except OSError as error:  # a full disk
            raise InputError(f"{plot}: cannot be written ({error.strerror or error})") from None
    summary = {
        "volume": str(args.volume), "axis": axis, "slices": len(profile.levels),
        "slice_spacing": volume.spacing[axis], "snli": significant(profile.snli), "mean_noise": significant(profile.mean),
        "levels": [significant(level) for level in profile.levels], "plot": str(plot) if plot else None,
    }
    text = (f"SNLI {profile.snli:.4g}, mean noise level {profile.mean:.4g} over {len(profile.levels)} slices "
            f"along axis {axis} ({volume.spacing[axis]:.4g} mm)" + (f"; profile -> {plot}" if plot else ""))
    reporter.done(summary, text)
    return 0

