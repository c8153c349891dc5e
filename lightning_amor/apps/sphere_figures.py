"""The tutorial's Figure 4.4 in TensorBoard: the objective's contours on the sphere with ŷ and y* marked.

:class:`SphereContours` draws, for a few fixed validation contexts, f(·; x) over the whole sphere on a
latitude/longitude grid (Mollweide or equirectangular), the reference solution y* (red star), the current
prediction ŷ (white circle), the predictions of the earlier drawn validations (the prediction's path over
training, dotted, as the tutorial's figure) and, for a semi-amortized model, the inner iterates ŷ⁰ … ŷᴷ of
this validation (solid).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_amor.figures import ValidationFigureCallback, log_figure, new_figure
from lightning_amor.objective import Context, context_batch_size, context_repeat

PROJECTIONS = ("mollweide", "equirectangular")


def lat_lon_grid(lat_steps: int, lon_steps: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Latitudes ``lat_steps``, longitudes ``lon_steps`` (radians, cell centres) and their unit points
    ``(lat_steps * lon_steps) x 3`` (row ``i * lon_steps + j`` is latitude i, longitude j), on ``like``'s device."""
    lat = (torch.arange(lat_steps, dtype=torch.float64) + 0.5) / lat_steps * math.pi - math.pi / 2
    lon = (torch.arange(lon_steps, dtype=torch.float64) + 0.5) / lon_steps * 2 * math.pi - math.pi
    la, lo = torch.meshgrid(lat, lon, indexing="ij")
    points = torch.stack([la.cos() * lo.cos(), la.cos() * lo.sin(), la.sin()], dim=-1).reshape(-1, 3)
    return lat, lon, points.to(device=like.device, dtype=like.dtype)


def to_lat_lon(y: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Latitude and longitude (radians) of ``... x 3`` points (normalised first)."""
    y = y.detach().double().cpu()
    y = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.asin(y[..., 2].clamp(-1, 1)).numpy(), torch.atan2(y[..., 1], y[..., 0]).numpy()


def _path(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A path with a break (NaN) wherever it wraps around the ±180° meridian, so no line crosses the map."""
    if lat.size < 2:
        return lat, lon
    breaks = np.nonzero(np.abs(np.diff(lon)) > math.pi)[0] + 1
    return np.insert(lat, breaks, np.nan), np.insert(lon, breaks, np.nan)


class SphereContours(ValidationFigureCallback):
    """Logs ``figures/sphere_contours``: f(·; x) on S² for ``num_contexts`` validation contexts, ŷ and y* marked.

    Works for any objective whose solutions are points of R³ used through their direction (``dim == 3``), such
    as :class:`~lightning_amor.apps.sphere.SphereObjective`. The reference y* is the batch's (or the module's
    ``refine`` solver run from ŷ when the batch has none).

    Args:
        every_n_validations: draw at the 1st, (N+1)-th, ... validation.
        num_contexts: contexts drawn, one panel each (the first ones of the first validation batch).
        lat_steps, lon_steps: the resolution of the grid on which f is evaluated.
        projection: ``mollweide`` (as the tutorial) or ``equirectangular`` (longitude and latitude in degrees).
        columns: panels per row.
        prefix: the tag prefix.
    """

    def __init__(
        self,
        every_n_validations: int = 1,
        num_contexts: int = 4,
        lat_steps: int = 60,
        lon_steps: int = 120,
        projection: str = "mollweide",
        columns: int = 2,
        prefix: str = "figures",
    ) -> None:
        super().__init__(every_n_validations, num_contexts, prefix)
        if projection not in PROJECTIONS:
            raise ValueError(f"SphereContours: projection must be one of {PROJECTIONS}, got {projection!r}")
        if lat_steps < 2 or lon_steps < 2 or columns < 1:
            raise ValueError(
                f"SphereContours: lat_steps and lon_steps must be at least 2 and columns at least 1, got "
                f"{lat_steps}, {lon_steps}, {columns}"
            )
        self.lat_steps, self.lon_steps = lat_steps, lon_steps
        self.projection = projection
        self.columns = columns
        self.history: list[Tensor] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        dim = getattr(pl_module.objective, "dim", None)
        if dim != 3:
            raise ValueError(
                f"SphereContours draws objectives on the sphere S² (solutions of dimension 3), but "
                f"{type(pl_module.objective).__name__}.dim is {dim}; remove the callback from this recipe"
            )

    def landscape(self, pl_module: pl.LightningModule, x: Context) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Latitudes ``I``, longitudes ``J`` and f on the grid, ``B x I x J``, for contexts ``x`` (``B``)."""
        like = x if isinstance(x, Tensor) else next(iter(x.values()))
        lat, lon, points = lat_lon_grid(self.lat_steps, self.lon_steps, like)
        batch, count = context_batch_size(x), points.shape[0]
        values = pl_module.objective(points.repeat(batch, 1), context_repeat(x, count))
        # context_repeat puts row b * count + r at x[b], and points.repeat(B, 1) puts points[r] there too
        grid = values.reshape(batch, self.lat_steps, self.lon_steps).double().cpu().numpy()
        return lat.numpy(), lon.numpy(), grid

    def draw(
        self, experiment: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Context,
        y_star: Optional[Tensor],
    ) -> None:
        output = pl_module.predict_batch(x)
        y = output.y.detach()
        y_star = pl_module.reference_solutions(x, y, y_star)
        if self.history and self.history[-1].shape != y.shape:
            self.history = []  # another set of contexts (a resumed run with other settings): start the path again
        self.history.append(y.cpu())
        lat, lon, values = self.landscape(pl_module, x)
        batch = values.shape[0]
        rows = -(-batch // self.columns)
        cols = min(batch, self.columns)
        figure = new_figure(4.2 * cols, 2.6 * rows + 0.6)
        kwargs = {"projection": "mollweide"} if self.projection == "mollweide" else {}
        scale = 1.0 if self.projection == "mollweide" else 180.0 / math.pi
        path = torch.stack(self.history, dim=1)  # B x V x 3: the prediction at every drawn validation
        iterates = torch.stack([t.detach() for t in output.iterates], dim=1) if len(output.iterates) > 1 else None
        for b in range(batch):
            ax = figure.add_subplot(rows, cols, b + 1, **kwargs)
            mesh = ax.pcolormesh(lon * scale, lat * scale, values[b], shading="auto", cmap="viridis")
            ax.contour(lon * scale, lat * scale, values[b], levels=10, colors="white", linewidths=0.4, alpha=0.6)
            figure.colorbar(mesh, ax=ax, shrink=0.7, pad=0.02)
            if path.shape[1] > 1:
                p_lat, p_lon = _path(*to_lat_lon(path[b]))
                ax.plot(p_lon * scale, p_lat * scale, ":", color="tab:blue", linewidth=1.5,
                        label="ŷ over training" if b == 0 else None)
            if iterates is not None:
                i_lat, i_lon = _path(*to_lat_lon(iterates[b]))
                ax.plot(i_lon * scale, i_lat * scale, "-o", color="orange", markersize=2.5, linewidth=1.0,
                        label="iterates ŷ⁰…ŷᴷ" if b == 0 else None)
            y_lat, y_lon = to_lat_lon(y[b])
            ax.plot(y_lon * scale, y_lat * scale, "o", markerfacecolor="white", markeredgecolor="black",
                    markersize=8, label="prediction ŷ" if b == 0 else None)
            if y_star is not None:
                s_lat, s_lon = to_lat_lon(y_star[b])
                ax.plot(s_lon * scale, s_lat * scale, "*", color="red", markeredgecolor="black", markersize=13,
                        label="reference y*" if b == 0 else None)
            if self.projection == "mollweide":
                ax.set_xticklabels([])
                ax.grid(alpha=0.3)
            else:
                ax.set_xlabel("longitude (°)")
                ax.set_ylabel("latitude (°)")
            ax.set_title(f"context {b}", fontsize=9)
        figure.legend(*figure.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=4, fontsize=8)
        figure.suptitle(f"f(·; x) on the sphere, step {trainer.global_step}", fontsize=10)
        log_figure(experiment, self.tag("sphere_contours"), figure, trainer.global_step)
