"""Pictures for `cycleinr snli` and `cycleinr evaluate`, drawn off-screen (matplotlib Agg).

Figures are built with matplotlib's object API (no pyplot state) and written atomically, so
an interrupted run leaves no half-written PNG.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np

from .evaluate import CaseResult
from .io import FLOAT32_MAX, atomic_output
from .metrics import snli


def _drop_unimportable_backend() -> None:
    """A notebook's inline backend (MPLBACKEND=module://...), inherited by `!cycleinr` run with
    another Python, fails matplotlib's import; these figures are drawn with Agg and need none."""
    backend = os.environ.get("MPLBACKEND", "")
    if backend.startswith("module://") and importlib.util.find_spec(backend[len("module://"):].split(".")[0]) is None:
        del os.environ["MPLBACKEND"]


def _import_figure_quietly():
    """matplotlib logs two warnings when HOME is not writable (a read-only container) and then
    works from a temporary folder, which serves these figures as well."""
    log = logging.getLogger("matplotlib")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from matplotlib.figure import Figure
    finally:
        log.setLevel(level)
    return Figure


_drop_unimportable_backend()
Figure = _import_figure_quietly()

PANEL_INCHES = 2.4


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write `figure` as PNG through a temporary file in the same folder, renamed when complete."""
    path = Path(path)
    with atomic_output(path) as temporary, warnings.catch_warnings():
        # a volume of a few slices gives panels too small to lay out; the picture is still written
        warnings.filterwarnings("ignore", message="constrained_layout not applied")
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # a name in CJK: boxes, not a warning
        figure.savefig(temporary, dpi=110, format="png")
    return path


def profile_figure(panels: Mapping[str, np.ndarray], slice_spacing: float, title: str,
                   reference: np.ndarray | None = None, reference_label: str = "truth") -> Figure:
    """Per-slice noise level against slice position (mm), one panel per profile, each over
    `reference` when given: interpolation shows as a saw-tooth under the truth's level."""
    figure = Figure(figsize=(8, 1.2 + 1.8 * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (label, levels) in zip(axes, panels.items()):
        if reference is not None:
            ax.plot(np.arange(len(reference)) * slice_spacing, reference, color="0.6", lw=1.2, label=reference_label)
        ax.plot(np.arange(len(levels)) * slice_spacing, levels, color="C0", lw=0.9,
                label=f"{label} (SNLI {snli(levels):.3g})")
        ax.set_ylabel("noise level")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("slice position (mm)")
    figure.suptitle(title, fontsize=10)
    return figure


def views_figure(result: CaseResult, title: str) -> Figure:
    """For each view: crops of input (nearest slice), every method and the truth, and under
    the methods their absolute error against the truth on one shared scale."""
    columns = list(next(iter(result.views.values())))
    methods = [c for c in columns if c not in ("input", "truth")]
    row_heights = []
    for view, crops in result.views.items():
        slice_spacing, in_plane = result.view_spacing[view]
        rows, width = crops["truth"].shape
        row_heights += [rows * slice_spacing / (width * in_plane)] * 2
    figure = Figure(figsize=(PANEL_INCHES * len(columns) + 1, PANEL_INCHES * sum(row_heights) + 0.6),
                    layout="constrained")
    axes = figure.subplots(len(row_heights), len(columns), squeeze=False, height_ratios=row_heights)
    for row, (view, crops) in enumerate(result.views.items()):
        # in float64, a cubic overshoot past float32's largest shown at it: differences of values
        # near 3.4e38 overflow float32, and one of inf spoils the error map's scale
        crops = {name: np.nan_to_num(crop.astype(np.float64), posinf=FLOAT32_MAX, neginf=-FLOAT32_MAX)
                 for name, crop in crops.items()}
        aspect = result.view_spacing[view][0] / result.view_spacing[view][1]
        low, high = np.percentile(crops["truth"], [1, 99])
        errors = {m: np.abs(crops[m] - crops["truth"]) for m in methods}
        error_max = max(float(np.percentile(e, 99.5)) for e in errors.values()) or 1.0
        for column, name in enumerate(columns):
            image_ax, error_ax = axes[2 * row, column], axes[2 * row + 1, column]
            image_ax.imshow(crops[name], cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect,
                            interpolation="nearest")
            image_ax.set_title(f"{view}: {name}", fontsize=9)
            if name in errors:
                shown = error_ax.imshow(errors[name], cmap="magma", vmin=0, vmax=error_max, origin="lower",
                                        aspect=aspect, interpolation="nearest")
                error_ax.set_title(f"|{name} - truth|", fontsize=9)
            for ax in (image_ax, error_ax):
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_frame_on(name in errors or ax is image_ax)
        figure.colorbar(shown, ax=axes[2 * row + 1, :], shrink=0.8, label="abs error")
    figure.suptitle(title, fontsize=10)
    return figure
