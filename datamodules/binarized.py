"""Binarised grey images for a Bernoulli likelihood, as the VAE literature binarises MNIST-like data sets.

A Bernoulli decoder p(x | z) needs pixels in {0, 1}. Grey levels g ∈ [0, 1] are turned into bits by one Bernoulli
draw per pixel, b ~ Bernoulli(g):

- **dynamic** binarisation in training (Salakhutdinov & Murray 2008; Burda et al. 2016): every training batch draws
  fresh bits from the grey levels, which acts as data augmentation and keeps the model from overfitting one
  particular draw;
- **one fixed** binarisation of the validation and test images: a seeded draw (``binarize_seed``) of each held-out
  image, made once for the whole split, so the first n test images have the same bits in every run, process, data
  module instance and training seed, and a test log-likelihood is a number about one fixed data set.

:class:`BinarizedFashionMNIST` is Fashion-MNIST binarised this way (Debian's ``dataset-fashion-mnist`` package by
default, or any folder of MNIST-named IDX files through ``root``, e.g. MNIST itself).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from datamodules.context import seeded_generator
from datamodules.fashion_mnist import FashionMNISTImages

Binarize = Literal["dynamic", "none"]

_SPLIT_CODES = {"val": 1, "test": 2}
_FIXED_STREAM = 0xB17


def bernoulli_bits(grey: Tensor, generator: torch.Generator) -> Tensor:
    """One Bernoulli draw per pixel, ``b = 1[u < g]`` with ``u ~ U[0, 1)`` from ``generator``: same shape and dtype
    as ``grey`` (values 0 and 1). Uniforms from a seeded CPU generator make the bits reproducible everywhere."""
    uniform = torch.rand(grey.shape, generator=generator, dtype=torch.float64)
    return (uniform < grey.double()).to(grey.dtype)


def fixed_binarization(grey: Tensor, seed: int, split: str) -> Tensor:
    """The fixed bits of a held-out split (``val`` or ``test``): :func:`bernoulli_bits` with a generator seeded by
    ``(seed, split)`` over the whole ``N x ...`` split at once, so image i's bits depend only on the seed, the split
    and i."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"fixed_binarization: split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    return bernoulli_bits(grey, seeded_generator(_FIXED_STREAM, seed, _SPLIT_CODES[split]))


class BinarizedFashionMNIST(FashionMNISTImages):
    """Fashion-MNIST (or any MNIST-named IDX folder) as binarised contexts ``1 x 28 x 28`` in {0, 1}.

    Training batches are binarised dynamically: batch i's bits are a fresh Bernoulli draw from its grey levels, made
    with that batch's own seeded generator (so a batch is still the same on every run and worker layout, and two
    batches, or two epochs of one image, differ). The validation and test images are binarised once, by
    :func:`fixed_binarization` with ``binarize_seed`` (independent of ``seed``). ``binarize: none`` keeps grey levels
    (a Bernoulli "likelihood" on grey levels is then a cross-entropy, not a likelihood of the data).

    Args:
        root: the folder with the IDX files (``None``: ``$FASHION_MNIST_DIR`` or Debian's folder; raises
            :class:`~datamodules.fashion_mnist.FashionMNISTNotFound` with the install hint when they are missing).
        binarize: ``dynamic`` (default) or ``none``.
        binarize_seed: the seed of the fixed validation and test bits.
        **kwargs: the :class:`~datamodules.fashion_mnist.FashionMNISTImages` arguments.
    """

    def __init__(self, root: Optional[str] = None, binarize: Binarize = "dynamic", binarize_seed: int = 0,
                 **kwargs) -> None:
        if binarize not in ("dynamic", "none"):
            raise ValueError(f"BinarizedFashionMNIST: binarize must be 'dynamic' or 'none', got {binarize!r}")
        super().__init__(root=root, **kwargs)
        if binarize == "dynamic" and self.train_size is not None:
            raise ValueError(f"BinarizedFashionMNIST: binarize: dynamic draws fresh bits for every batch, but "
                             f"train_size={self.train_size} fixes a pool binarised once; unset train_size, or use "
                             f"binarize: none")
        self.binarize = binarize
        self.binarize_seed = int(binarize_seed)
        self._fixed: dict[str, Tensor] = {}

    def images(self, split: str) -> Tensor:
        """The ``N x 1 x H x W`` images of ``split``: grey levels for ``train`` (binarised per batch by
        :meth:`sample`), the fixed bits for ``val`` and ``test`` (grey levels with ``binarize: none``)."""
        grey = super().images(split)
        if split == "train" or self.binarize == "none":
            return grey
        if split not in self._fixed:
            self._fixed[split] = fixed_binarization(grey, self.binarize_seed, split)
        return self._fixed[split]

    def sample(self, num: int, generator: torch.Generator) -> Tensor:
        """``num`` random training images, binarised by a fresh draw from ``generator``: ``num x 1 x H x W``."""
        grey = super().sample(num, generator)
        return grey if self.binarize == "none" else bernoulli_bits(grey, generator)
