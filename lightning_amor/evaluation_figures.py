"""The figures of an :class:`~lightning_amor.evaluation.EvaluationReport`, as PNG files and in TensorBoard.

- ``gap``: the histogram of the amortization gap f(ŷ) − f(y_ref) per context;
- ``speedup``: the solver's mean objective from scratch against its iterations and its seconds, with the amortized
  level mean f(ŷ) (and the references' mean f) as horizontal lines and the prediction's time as a star (the
  tutorial's Figures 4.1–4.3);
- ``warm_start``: the median certificate (residual) of the solver from scratch and from ŷ against iterations and
  seconds, on a log scale, with the tolerance as a horizontal line.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Union

from matplotlib.figure import Figure

from lightning_amor.evaluation import EvaluationReport
from lightning_amor.figures import curve_figure, histogram_figure, new_figure
from lightning_amor.results import write_atomically

FIGURES = ("gap", "speedup", "warm_start")
"""The figures of a report, by the suffix of their file names and TensorBoard tags."""

RESIDUAL_FLOOR = 1e-12
"""Residuals are drawn no lower than this on the log axis (an exact zero has no logarithm)."""


def gap_figure(report: EvaluationReport) -> Figure:
    """The histogram of the ``B`` amortization gaps f(ŷ) − f(y_ref)."""
    return histogram_figure(report.gap, xlabel="f(ŷ) − f(y_ref)", title=f"{report.name}: amortization gap")


def speedup_figure(report: EvaluationReport) -> Figure:
    """The solver from scratch (mean ± std of f over the contexts) against iterations and seconds, with the
    amortized level and the prediction's time."""
    curve = report.scratch
    levels = {"amortized, mean f(ŷ)": report.target, "reference, mean f(y_ref)": float(report.f_ref.mean())}
    figure = new_figure(10.0, 3.8)
    left, right = figure.subplots(1, 2)
    curves = {"solver from scratch": curve.objective}
    curve_figure(curve.iterations, curves, levels, xlabel="solver iteration", ax=left)
    curve_figure(curve.seconds, curves, levels, xlabel="solver seconds", ax=right)
    right.plot([report.prediction_seconds], [report.target], "k*", markersize=10,
               label=f"prediction: {1000 * report.prediction_seconds:.3g} ms")
    k = report.matched_iteration
    if k is not None:
        left.axvline(k, color="tab:red", linestyle=":", label=f"matched at {k}")
        right.axvline(curve.seconds_at(k), color="tab:red", linestyle=":", label="matched")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    figure.suptitle(f"{report.name}: {report.solver} from scratch vs the amortized model "
                    f"({report.contexts} contexts)", fontsize=9)
    return figure


def warm_start_figure(report: EvaluationReport) -> Figure:
    """The median residual from scratch and from ŷ against iterations and seconds, with the tolerance."""
    figure = new_figure(10.0, 3.8)
    left, right = figure.subplots(1, 2)
    levels = {f"tolerance {report.tolerance:g}": report.tolerance}
    for ax, axis, label in ((left, "iterations", "solver iteration"), (right, "seconds", "solver seconds")):
        for curve, name, color in ((report.scratch, "from scratch", "tab:blue"), (report.warm, "from ŷ", "tab:green")):
            median = curve.residual.nanmedian(1).values.clamp_min(RESIDUAL_FLOOR)
            ax.plot(getattr(curve, axis).numpy(), median.numpy(), color=color, label=f"{name} (median)")
        curve_figure([], {}, levels, xlabel=label, ylabel="residual", logy=True, ax=ax)
    figure.suptitle(f"{report.name}: the certificate from scratch vs warm-started from ŷ "
                    f"({report.contexts} contexts)", fontsize=9)
    return figure


def figures(report: EvaluationReport) -> dict[str, Figure]:
    """Every figure of the report, by name (:data:`FIGURES`)."""
    return {"gap": gap_figure(report), "speedup": speedup_figure(report), "warm_start": warm_start_figure(report)}


def render_figures(report: EvaluationReport, dpi: int = 120) -> dict[str, bytes]:
    """Every figure of the report drawn once, as PNG bytes by name (for :func:`save_figures` and
    :func:`log_to_tensorboard`, so neither draws again)."""
    rendered = {}
    for name, figure in figures(report).items():
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi)
        rendered[name] = buffer.getvalue()
    return rendered


def save_figures(
    report: EvaluationReport, folder: Union[str, Path], prefix: str, rendered: Optional[dict[str, bytes]] = None,
) -> dict[str, Path]:
    """Write the figures as ``folder/{prefix}_{name}.png`` (each atomically; ``rendered``: the PNGs of
    :func:`render_figures`, drawn now when ``None``); returns name -> path."""
    paths = {}
    for name, png in (rendered or render_figures(report)).items():
        path = Path(folder) / f"{prefix}_{name}.png"
        write_atomically(path, png)
        paths[name] = path
    return paths


def log_to_tensorboard(
    report: EvaluationReport, folder: Union[str, Path], rendered: Optional[dict[str, bytes]] = None,
) -> Path:
    """Write the report to a TensorBoard event file under ``folder``: the figures as images (``evaluate/{name}``;
    ``rendered`` as in :func:`save_figures`), the gaps as a histogram, the solver's mean objective and the median
    residuals by iteration as scalars, and the table as text. Returns the folder."""
    from matplotlib.image import imread
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    try:
        for name, png in (rendered or render_figures(report)).items():
            image = imread(io.BytesIO(png), format="png")[..., :3]  # H x W x RGB(A) floats in [0, 1]
            writer.add_image(f"evaluate/{name}", image, global_step=0, dataformats="HWC")
        writer.add_histogram("evaluate/gap_per_context", report.gap, global_step=0)
        for k, mean in zip(report.scratch.iterations.tolist(), report.scratch.objective.mean(1).tolist(), strict=True):
            writer.add_scalar("evaluate/solver_mean_objective", mean, k)
            writer.add_scalar("evaluate/amortized_mean_objective", report.target, k)
        for curve in (report.scratch, report.warm):
            medians = curve.residual.nanmedian(1).values.tolist()
            for k, median in zip(curve.iterations.tolist(), medians, strict=True):
                writer.add_scalar(f"evaluate/median_residual_from_{curve.start}", median, k)
        writer.add_text("evaluate/table", report.table().replace("\n", "  \n"), 0)
    finally:
        writer.close()
    return Path(folder)
