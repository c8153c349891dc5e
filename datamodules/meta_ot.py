"""Pairs of images as pairs of histograms: the contexts of Meta OT (:mod:`lightning_amor.apps.meta_ot`).

A context is ``2 x n``: two images of one data set flattened to ``n = side²`` pixels, each turned into a histogram
by adding a small ``floor`` to every pixel (so that every pixel carries mass and its dual potential is determined)
and dividing by the total. The images come from an :class:`~datamodules.images.ImageDataModule`: scikit-learn's
bundled 8×8 digits (``images: digits``, no download) or Fashion-MNIST's 28×28 images (``images: fashion_mnist``,
Debian's ``dataset-fashion-mnist``; see :mod:`datamodules.fashion_mnist`).

Training pairs are two random training images, fresh at every step. The validation set pairs the ``val_size``
held-out validation images as (0, 1), (1, 2), …, (val_size − 1, 0), and the test set its ``test_size`` images the
same way, so a split of m pairs needs only m images and no held-out image is ever seen in training.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from datamodules.context import ContextDataModule
from datamodules.images import DigitsImages, ImageDataModule

ImageSet = Literal["digits", "fashion_mnist"]


def histograms(images: Tensor, floor: float) -> Tensor:
    """``N x n`` histograms from ``N x ...`` images in [0, 1]: ``(image + floor) / sum``, each summing to one."""
    flat = images.flatten(1) + floor
    return flat / flat.sum(-1, keepdim=True)


class ImagePairs(ContextDataModule):
    """Contexts are pairs of histograms ``2 x n`` made from two images (see the module).

    Args:
        images: the image set, ``digits`` (8×8, bundled) or ``fashion_mnist`` (28×28, Debian's package).
        root: Fashion-MNIST's folder (``None``: the one :func:`~datamodules.fashion_mnist.fashion_mnist_folder`
            finds); unused for the digits.
        download: fetch Fashion-MNIST into ``root`` (needs network access).
        floor: the mass added to every pixel (grey values in [0, 1]) before normalising; > 0.
        split_seed: the seed of the permutation that holds out the validation (and, for the digits, test) images.
        val_size: validation pairs (as many held-out images).
        test_size: test pairs (as many held-out images: from the digits' 1797, or Fashion-MNIST's test file).
        **kwargs: the :class:`~datamodules.context.ContextDataModule` arguments.
    """

    def __init__(
        self, images: ImageSet = "digits", root: Optional[str] = None, download: bool = False, floor: float = 1e-2,
        split_seed: int = 0, val_size: int = 128, test_size: int = 200, **kwargs,
    ) -> None:
        super().__init__(val_size=val_size, test_size=test_size, **kwargs)
        if images not in ("digits", "fashion_mnist"):
            raise ValueError(f"ImagePairs: images must be 'digits' or 'fashion_mnist', got {images!r}")
        if not floor > 0:
            raise ValueError(f"ImagePairs: floor must be positive (log-domain Sinkhorn needs mass on every pixel of a "
                             f"learned potential's support), got {floor}")
        if val_size < 2 or test_size < 2:
            raise ValueError(f"ImagePairs: val_size and test_size must be at least 2 (a pair needs two images), got "
                             f"{val_size} and {test_size}")
        self.image_set = images
        self.root = root
        self.download = download
        self.floor = float(floor)
        self.split_seed = split_seed
        self._source: Optional[ImageDataModule] = None

    @property
    def source(self) -> ImageDataModule:
        """The image data module the pairs are made from (built on first use)."""
        if self._source is None:
            sizes = {"val_size": self.val_size, "test_size": self.test_size, "split_seed": self.split_seed}
            if self.image_set == "digits":
                self._source = DigitsImages(**sizes)
            else:
                from datamodules.fashion_mnist import FashionMNISTImages

                self._source = FashionMNISTImages(root=self.root, download=self.download, **sizes)
        return self._source

    @property
    def side(self) -> int:
        """The grid's side (8 for the digits, 28 for Fashion-MNIST)."""
        return int(self.source.images("val").shape[-1])

    def _pairs(self, images: Tensor, first: Tensor, second: Tensor) -> Tensor:
        """``num x 2 x n``: the histograms of ``images[first]`` and ``images[second]``. Only the chosen images are
        normalised (normalising all 60000 Fashion-MNIST training images for a batch of 64 cost 0.19 s a step)."""
        dtype = torch.get_default_dtype()
        return torch.stack([histograms(images[first], self.floor).to(dtype),
                            histograms(images[second], self.floor).to(dtype)], dim=1)

    def sample(self, num: int, generator: torch.Generator) -> Tensor:
        """``num`` pairs of two random training images: ``num x 2 x n``."""
        train = self.source.images("train")
        first = torch.randint(train.shape[0], (num,), generator=generator)
        second = torch.randint(train.shape[0], (num,), generator=generator)
        return self._pairs(train, first, second)

    def sample_split(self, split: str, num: int, generator: torch.Generator) -> Tensor:
        """The ``num`` pairs of held-out images of ``val`` or ``test`` (image i with image i + 1, cyclically); fresh
        training pairs for ``pool``."""
        if split == "pool":
            return self.sample(num, generator)
        images = self.source.images(split)
        if num > images.shape[0]:
            raise ValueError(f"ImagePairs: {split}_size={num} pairs need {num} held-out images, but the {split} split "
                             f"holds {images.shape[0]}; lower data.init_args.{split}_size")
        index = torch.arange(num)
        return self._pairs(images[:num], index, (index + 1) % num)

    def mean_pair(self) -> Tensor:
        """``1 x 2 x n``: the histogram of the mean training image, twice (the problem of the baseline warm start)."""
        mean = histograms(self.source.images("train").mean(0, keepdim=True), self.floor)
        return torch.stack([mean, mean], dim=1).to(torch.get_default_dtype())
