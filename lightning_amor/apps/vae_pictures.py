"""What a trained VAE's decoder draws: samples from the prior and a traversal of a 2-D latent, as image grids.

* :func:`prior_samples`: the decoded means sigmoid(decoder(z)) of latents z ~ N(0, I) drawn from a seeded
  generator (the same z at every call, so successive pictures of one run show the decoder learning);
* :func:`latent_traversal`: the decoded means over a grid of two latent coordinates (the others at 0), placed at
  the standard normal's quantiles of evenly spaced probabilities, as Kingma & Welling's (2014) 2-D manifold figure;
* :func:`save_grid_png` writes an image grid (``C x H x W`` in [0, 1], from
  :func:`~lightning_amor.apps.vae.image_grid`) as a PNG file with optional row labels;
* :class:`VAEPictures`: a callback that logs both grids to TensorBoard at every validation
  (``figures/vae_prior_samples`` and, for a 2-D latent, ``figures/vae_latent_traversal``).

``python -m lightning_amor.apps.vae_pictures --ckpt C --out DIR`` writes both pictures of a checkpoint as PNG files
``DIR/<run>_*.png`` (and TensorBoard events under ``DIR/tensorboard/<run>``).
"""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_amor.apps.vae import ELBOObjective, image_grid
from lightning_amor.apps.vae_figures import as_images
from lightning_amor.figures import ValidationFigureCallback, new_figure
from lightning_amor.objective import Context
from lightning_amor.results import write_atomically

Traversal = Literal["auto", "always", "never"]


def _check_objective(objective: Any, who: str) -> ELBOObjective:
    if not isinstance(objective, ELBOObjective):
        raise TypeError(f"{who} decodes latents with an ELBOObjective's decoder, got {type(objective).__name__}")
    return objective


def _check_shape(image_shape: Sequence[int], who: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{who}: image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)}")
    return shape  # type: ignore[return-value]


def decode_latents(objective: ELBOObjective, z: Tensor, image_shape: Sequence[int]) -> Tensor:
    """The decoded means sigmoid(decoder(z)) of latents ``N x L``: images ``N x C x H x W`` in [0, 1].

    Raises:
        ValueError: ``z`` is not ``N x L`` with the objective's L, or holds NaN/inf.
        ObjectiveShapeError: the decoder does not return ``C·H·W`` logits per latent.
    """
    objective = _check_objective(objective, "decode_latents")
    shape = _check_shape(image_shape, "decode_latents")
    if z.dim() != 2 or z.shape[1] != objective.latent_dim:
        raise ValueError(
            f"decode_latents: latents must be N x L with L = {objective.latent_dim} (the objective's latent_dim), "
            f"got shape {tuple(z.shape)}"
        )
    if not torch.isfinite(z).all():
        raise ValueError("decode_latents: the latents hold NaN or inf")
    like = z.new_empty((z.shape[0], *shape))  # only its shape is read: the pixel count per image
    with torch.no_grad():
        return torch.sigmoid(objective.logits(z.unsqueeze(1), like)).reshape(like.shape)


def prior_samples(objective: ELBOObjective, num: int, image_shape: Sequence[int], seed: int = 0) -> Tensor:
    """Decoded means of ``num`` latents z ~ N(0, I) drawn from a generator seeded with ``seed``:
    ``num x C x H x W`` (on the decoder's device).

    The means, not Bernoulli draws from them: the usual way to show a VAE's samples (a draw adds pixel noise only).
    """
    objective = _check_objective(objective, "prior_samples")
    if num < 1:
        raise ValueError(f"prior_samples: num must be at least 1, got {num}")
    device = next((p.device for p in objective.decoder.parameters()), torch.device("cpu"))
    z = torch.randn((num, objective.latent_dim), generator=torch.Generator().manual_seed(seed))
    return decode_latents(objective, z.to(device), image_shape)


def traversal_values(steps: int, low: float = 0.05, high: float = 0.95) -> Tensor:
    """``steps`` latent values: the standard normal's quantiles of ``steps`` evenly spaced probabilities from
    ``low`` to ``high`` (so the grid covers the prior's mass evenly): ``steps``, increasing."""
    if steps < 2:
        raise ValueError(f"traversal_values: steps must be at least 2, got {steps}")
    if not 0.0 < low < high < 1.0:
        raise ValueError(f"traversal_values: need 0 < low < high < 1 (probabilities), got {low} and {high}")
    p = torch.linspace(low, high, steps, dtype=torch.float64)
    return (math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)).float()


def latent_traversal(
    objective: ELBOObjective, image_shape: Sequence[int], steps: int = 15, dims: Sequence[int] = (0, 1),
    low: float = 0.05, high: float = 0.95,
) -> Tensor:
    """Decoded means over a ``steps x steps`` grid of the latent coordinates ``dims = (i, j)``, every other
    coordinate 0: ``steps x steps x C x H x W``.

    Entry ``[r, c]`` decodes z with ``z_i = v[c]`` (left to right, increasing) and ``z_j = v[steps − 1 − r]`` (top
    to bottom, decreasing), ``v`` = :func:`traversal_values`. For a 2-D latent this is the whole latent space.
    """
    objective = _check_objective(objective, "latent_traversal")
    i, j = (int(d) for d in dims)
    if len(dims) != 2 or i == j or not (0 <= i < objective.latent_dim and 0 <= j < objective.latent_dim):
        raise ValueError(
            f"latent_traversal: dims must be two different coordinates in [0, {objective.latent_dim}), got "
            f"{tuple(dims)}"
        )
    values = traversal_values(steps, low, high)
    device = next((p.device for p in objective.decoder.parameters()), torch.device("cpu"))
    z = torch.zeros((steps, steps, objective.latent_dim))
    z[:, :, i] = values.view(1, steps)
    z[:, :, j] = values.flip(0).view(steps, 1)
    images = decode_latents(objective, z.reshape(steps * steps, -1).to(device), image_shape)
    return images.reshape(steps, steps, *images.shape[1:])


def tile(images: Tensor, columns: int, pad: int = 1, pad_value: float = 1.0) -> Tensor:
    """Images ``N x C x H x W`` (N a multiple of ``columns``) tiled row by row into one ``C x H' x W'`` grid."""
    if images.dim() != 4 or columns < 1 or images.shape[0] % columns:
        raise ValueError(
            f"tile: need N x C x H x W images with N a multiple of columns={columns}, got {tuple(images.shape)}"
        )
    return image_grid(list(images.split(columns)), pad=pad, pad_value=pad_value)


def save_grid_png(path: Union[str, Path], grid: Tensor, labels: Optional[Sequence[str]] = None,
                  title: Optional[str] = None, invert: bool = False) -> Path:
    """Write a grid ``C x H x W`` in [0, 1] (C = 1 or 3) as a PNG (atomically), with a label per row of images when
    given."""
    if grid.dim() != 3 or grid.shape[0] not in (1, 3):
        raise ValueError(f"save_grid_png: the grid must be C x H x W with C = 1 or 3, got {tuple(grid.shape)}")
    picture = grid.detach().float().cpu().clamp(0, 1)
    picture = 1.0 - picture if invert else picture
    height, width = picture.shape[1:]
    path = Path(path)
    fig = new_figure(width / 40 + (1.4 if labels else 0.3), height / 40 + (0.4 if title else 0.2))
    ax = fig.subplots()
    ax.imshow(picture[0].numpy() if picture.shape[0] == 1 else picture.permute(1, 2, 0).numpy(), cmap="gray",
              vmin=0, vmax=1, interpolation="nearest")
    if labels:
        ax.set_yticks([(r + 0.5) * height / len(labels) for r in range(len(labels))], list(labels), fontsize=7)
    else:
        ax.set_yticks([])
    ax.set_xticks([])
    if title:
        ax.set_title(title, fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150)
    write_atomically(path, buffer.getvalue())
    return path


class VAEPictures(ValidationFigureCallback):
    """Logs what the decoder draws at every ``every_n_validations``-th validation (TensorBoard images):

    * ``figures/vae_prior_samples``: :func:`prior_samples` of ``rows x columns`` fixed latents (the same z each
      time, so the images show the decoder learning);
    * ``figures/vae_latent_traversal``: :func:`latent_traversal` of the latent coordinates ``traversal_dims``
      over a ``traversal_steps``² grid, when ``traversal`` is ``always``, or ``auto`` and the latent is 2-D.

    The image shape is that of the validation images. Args: ``every_n_validations`` as
    :class:`~lightning_amor.figures.ValidationFigureCallback`; ``rows``, ``columns``: the prior-sample grid;
    ``seed``: the seed of the prior's latents; ``traversal``: ``auto``/``always``/``never``;
    ``traversal_steps``: values per traversed coordinate; ``traversal_dims``: the two coordinates traversed;
    ``prefix``: the tag prefix.
    """

    def __init__(
        self, every_n_validations: int = 1, rows: int = 8, columns: int = 8, seed: int = 0,
        traversal: Traversal = "auto", traversal_steps: int = 15, traversal_dims: Sequence[int] = (0, 1),
        prefix: str = "figures",
    ) -> None:
        super().__init__(every_n_validations, 1, prefix)
        if rows < 1 or columns < 1:
            raise ValueError(f"VAEPictures: rows and columns must be at least 1, got {rows} and {columns}")
        if traversal not in ("auto", "always", "never"):
            raise ValueError(f"VAEPictures: traversal must be 'auto', 'always' or 'never', got {traversal!r}")
        traversal_values(traversal_steps)  # the same check as at drawing time, but now
        self.rows, self.columns, self.seed = rows, columns, seed
        self.traversal = traversal
        self.traversal_steps = traversal_steps
        self.traversal_dims = tuple(int(d) for d in traversal_dims)
        if len(self.traversal_dims) != 2 or self.traversal_dims[0] == self.traversal_dims[1]:
            raise ValueError(f"VAEPictures: traversal_dims must be two different coordinates, got {traversal_dims}")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        objective = _check_objective(pl_module.objective, "VAEPictures")
        if self.traverses(objective) and max(self.traversal_dims) >= objective.latent_dim:
            raise ValueError(
                f"VAEPictures: traversal_dims {self.traversal_dims} are not coordinates of the "
                f"{objective.latent_dim}-D latent; choose two in [0, {objective.latent_dim})"
            )

    def traverses(self, objective: ELBOObjective) -> bool:
        """Whether the traversal is drawn for this objective."""
        return self.traversal == "always" or (self.traversal == "auto" and objective.latent_dim == 2)

    def pictures(self, objective: ELBOObjective, image_shape: Sequence[int]) -> dict[str, Tensor]:
        """The grids ``C x H' x W'`` by tag name: ``vae_prior_samples`` and maybe ``vae_latent_traversal``."""
        samples = prior_samples(objective, self.rows * self.columns, image_shape, self.seed)
        shown = {"vae_prior_samples": tile(samples.cpu(), self.columns)}
        if self.traverses(objective):
            grid = latent_traversal(objective, image_shape, self.traversal_steps, self.traversal_dims)
            shown["vae_latent_traversal"] = tile(grid.flatten(0, 1).cpu(), self.traversal_steps)
        return shown

    def draw(self, experiment: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Context,
             y_star: Optional[Tensor]) -> None:
        image_shape = as_images(x).shape[1:]
        for name, grid in self.pictures(pl_module.objective, image_shape).items():
            experiment.add_image(self.tag(name), grid, trainer.global_step)


def main(argv: Optional[list[str]] = None) -> dict[str, Path]:
    """Write a checkpoint's prior samples (and, for a 2-D latent, its traversal) as PNGs and TensorBoard images."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--ckpt", required=True, help="checkpoint of a VAE recipe")
    parser.add_argument("--out", required=True, help="folder of the PNG files (and of tensorboard/)")
    parser.add_argument("--name", default=None, help="file name prefix (default: the recipe's run folder name)")
    parser.add_argument("--image-shape", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                        help="image shape (default: read from the checkpoint's data module)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--steps", type=int, default=15, help="values per coordinate of the traversal")
    parser.add_argument("--traversal", default="auto", choices=("auto", "always", "never"))
    parser.add_argument("--dims", type=int, nargs=2, default=(0, 1), help="the two latent coordinates traversed")
    args = parser.parse_args(argv)
    from torch.utils.tensorboard import SummaryWriter

    from lightning_amor.loading import load_datamodule, load_module

    module = load_module(args.ckpt, map_location="cpu")
    if args.image_shape:
        shape = tuple(args.image_shape)
    else:
        data = load_datamodule(args.ckpt)
        if data is None or not hasattr(data, "image_shape"):
            parser.error(f"{args.ckpt} does not store an image data module to read the image shape from; pass "
                         f"--image-shape C H W")
        shape = tuple(data.image_shape)  # the grey training images: nothing is binarised to read a shape
    name = args.name or run_name(args.ckpt)
    callback = VAEPictures(rows=args.rows, columns=args.columns, traversal=args.traversal,
                           traversal_steps=args.steps, traversal_dims=args.dims)
    out = Path(args.out)
    written = {}
    with SummaryWriter(str(out / "tensorboard" / name)) as writer:
        for tag, grid in callback.pictures(module.objective, shape).items():
            label = tag.removeprefix("vae_").replace("_", " ")
            written[tag] = save_grid_png(out / f"{name}_{tag.removeprefix('vae_')}.png", grid,
                                         title=f"{name}: {label}")
            writer.add_image(f"{name}/{tag}", grid, 0)
    for path in written.values():
        print(path)
    return written


def run_name(ckpt: Union[str, Path]) -> str:
    """The recipe's run folder name of a checkpoint ``runs/<app>/<name>/checkpoints/last.ckpt`` (else its stem)."""
    path = Path(ckpt)
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.stem


if __name__ == "__main__":
    main()
