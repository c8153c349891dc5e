"""Image data sets as context distributions: MNIST (IDX files) and scikit-learn's bundled 8×8 digits.

Every image is one context x (``1 x H x W``, grey values in [0, 1]). Training draws fresh batches of
random training images; the validation and test sets are fixed sets of held-out images, so the
amortization model is always measured on problems it never trained on.
"""

from __future__ import annotations

import gzip
import os
import struct
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.context import ContextDataModule, seeded_generator

# IDX type codes (the third byte of the magic number) and their big-endian numpy types
_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_TYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


class IDXFormatError(ValueError):
    """A file is not a well-formed IDX file."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed, told apart by their content) into a numpy array.

    The IDX format (as used by MNIST): two zero bytes, a type code, the number of dimensions d,
    then d big-endian 32-bit sizes and the data in big-endian C order.

    Raises:
        IDXFormatError: naming the file when the header is malformed or the data is truncated.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise IDXFormatError(f"{path}: a gzip file that cannot be decompressed ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise IDXFormatError(
            f"{path}: not an IDX file (expected the magic bytes 00 00 <type> <ndim>, got {raw[:4].hex(' ')})"
        )
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise IDXFormatError(
            f"{path}: the header announces shape {shape} of {dtype.name} ({expected} bytes in all) but the "
            f"file holds {len(raw)} bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file, gzip-compressed when ``path`` ends in ``.gz``. Returns the path."""
    path = Path(path)
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"write_idx: IDX has no type for {array.dtype}; use one of {sorted(map(str, _IDX_CODES))}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    blob = header + array.astype(_IDX_TYPES[code]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(blob) if path.suffix == ".gz" else blob)
    return path


def resize_images(images: Tensor, size: Optional[int]) -> Tensor:
    """Bilinear resize of ``N x C x H x W`` images to ``size x size`` (unchanged for ``None``), clamped to [0, 1]."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized.clamp(0.0, 1.0)


class ImageDataModule(ContextDataModule):
    """Contexts are images ``C x H x W`` in [0, 1] from a finite data set.

    Subclasses implement :meth:`load_images`, which returns the training images and, where the data
    set has an official test split, the test images. The validation set (``val_size`` images) and,
    without an official test split, the test set (``test_size`` images) are held out from the
    training images by a fixed permutation; training batches are drawn without replacement from the
    remaining images only.

    Args:
        resize: resize every image to ``resize x resize`` (bilinear), e.g. 32 for the reference's
            MNIST encoder; ``None`` keeps the native size.
        split_seed: the seed of the permutation that chooses the held-out images (independent of
            ``seed``, so changing the training seed never moves images between the splits).
        **kwargs: the :class:`~datamodules.context.ContextDataModule` arguments.
    """

    official_test: bool = False
    """Whether :meth:`load_images` returns a test split of its own (otherwise it is held out from training)."""

    def __init__(self, resize: Optional[int] = None, split_seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        if resize is not None and resize < 1:
            raise ValueError(f"{type(self).__name__}: resize must be a positive size or null, got {resize}")
        self.resize = resize
        self.split_seed = split_seed
        self._images: Optional[dict[str, Tensor]] = None

    def load_images(self) -> tuple[Tensor, Optional[Tensor]]:
        """``(train, test)``: ``N x H x W`` or ``N x C x H x W`` images in [0, 1] (``test`` may be ``None``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_images()")

    def images(self, split: str) -> Tensor:
        """The ``N x C x H x W`` images of ``split`` (``train``, ``val`` or ``test``), loaded on first use."""
        if self._images is None:
            self._images = self._split_images()
        return self._images[split]

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``C x H x W`` of one image (after resizing)."""
        return tuple(self.images("train").shape[1:])

    def _split_images(self) -> dict[str, Tensor]:
        train, test = self.load_images()
        train = _as_images(train, "training")
        holdout = self.val_size + (self.test_size if test is None else 0)
        if holdout >= train.shape[0]:
            wanted = f"val_size={self.val_size}" + (f" + test_size={self.test_size}" if test is None else "")
            raise ValueError(
                f"{type(self).__name__}: {wanted} held-out images leave none of the {train.shape[0]} "
                f"training images to train on; lower the held-out sizes"
            )
        order = torch.randperm(train.shape[0], generator=seeded_generator(self.split_seed, 0xDA7A))
        splits = {"val": train[order[: self.val_size]]}
        if test is None:
            splits["test"] = train[order[self.val_size : holdout]]
        else:
            splits["test"] = _as_images(test, "test")
        splits["train"] = train[order[holdout:]]
        return {k: resize_images(v, self.resize).contiguous() for k, v in splits.items()}

    def setup(self, stage: Optional[str] = None) -> None:
        available = self.images("train").shape[0]
        if self.batch_size > available:
            raise ValueError(
                f"{type(self).__name__}: batch_size={self.batch_size} exceeds the {available} training images "
                f"(after holding out the validation{'' if self.official_test else ' and test'} images); "
                f"lower data.init_args.batch_size"
            )
        if self.train_size is not None and self.train_size > available:
            raise ValueError(
                f"{type(self).__name__}: train_size={self.train_size} exceeds the {available} training images"
            )
        super().setup(stage)

    def sample(self, num: int, generator: torch.Generator) -> Tensor:
        """``num`` random training images (distinct within the batch): ``num x C x H x W``."""
        train = self.images("train")
        if num > train.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: a batch of {num} images exceeds the {train.shape[0]} training images"
            )
        return train[torch.randperm(train.shape[0], generator=generator)[:num]]

    def sample_split(self, split: str, num: int, generator: torch.Generator) -> Tensor:
        """The first ``num`` held-out images of ``val`` or ``test``; training images for ``pool``."""
        if split == "pool":
            return self.sample(num, generator)
        images = self.images(split)
        if num > images.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: {split}_size={num} exceeds the {images.shape[0]} held-out {split} images; "
                f"lower data.init_args.{split}_size"
            )
        return images[:num]


def _as_images(images: Tensor | np.ndarray, what: str) -> Tensor:
    images = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(f"{what} images must be N x H x W or N x C x H x W, got shape {tuple(images.shape)}")
    images = images.to(torch.get_default_dtype())
    if images.numel() and not (0.0 <= float(images.min()) and float(images.max()) <= 1.0):
        raise ValueError(f"{what} images must lie in [0, 1], got values in [{images.min()}, {images.max()}]")
    return images


class DigitsImages(ImageDataModule):
    """scikit-learn's bundled 8×8 handwritten digits (1797 images, no download), scaled to [0, 1].

    There is no official test split: validation and test images are held out from the 1797.

    Args:
        val_size: validation images held out from the 1797.
        test_size: test images held out from the 1797 (the speed-up benchmark takes its batch from them).
        resize: optional resize (e.g. 32 for the conv networks made for MNIST).
        split_seed: the seed of the held-out permutation.
        **kwargs: the :class:`~datamodules.context.ContextDataModule` arguments.
    """

    def __init__(
        self, val_size: int = 256, test_size: int = 256, resize: Optional[int] = None, split_seed: int = 0, **kwargs
    ) -> None:
        super().__init__(val_size=val_size, test_size=test_size, resize=resize, split_seed=split_seed, **kwargs)

    def load_images(self) -> tuple[Tensor, None]:
        """All 1797 images ``1797 x 8 x 8`` (grey levels 0..16 divided by 16) and no test split."""
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError(
                "DigitsImages needs scikit-learn (its bundled digits data set): pip install scikit-learn, or "
                "install lightning-amor with the `apps` extra"
            ) from err
        return torch.as_tensor(load_digits().images / 16.0), None


MNIST_FILES = {
    "train": "train-images-idx3-ubyte",
    "test": "t10k-images-idx3-ubyte",
}
"""The MNIST image files (each may also be gzip-compressed, with ``.gz`` appended). Labels are not needed."""

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)


class MNISTImages(ImageDataModule):
    """MNIST read from the standard IDX files in a local folder (60000 training, 10000 test images).

    The folder must hold ``train-images-idx3-ubyte`` and ``t10k-images-idx3-ubyte``, each plain or
    gzip-compressed (``.gz``). With ``download=True`` missing files are fetched from a public mirror
    first. The validation set is held out from the training file; the test set is the t10k file.

    Args:
        root: the folder with the IDX files.
        download: fetch missing files (needs network access).
        resize: optional resize, e.g. 32 as the reference's encoder (which expects 32×32 images).
        split_seed: the seed of the permutation that holds out the validation images.
        mirrors: base URLs tried in turn by ``download``.
        val_size: validation images held out from the 60000 training images.
        test_size: test images, the first of the 10000 of the t10k file.
        **kwargs: the :class:`~datamodules.context.ContextDataModule` arguments.
    """

    def __init__(
        self,
        root: str = "data/mnist",
        download: bool = False,
        resize: Optional[int] = None,
        split_seed: int = 0,
        mirrors: Sequence[str] = MNIST_MIRRORS,
        val_size: int = 5000,
        test_size: int = 10000,
        **kwargs,
    ) -> None:
        super().__init__(val_size=val_size, test_size=test_size, resize=resize, split_seed=split_seed, **kwargs)
        self.root = Path(root)
        self.download = download
        self.mirrors = tuple(mirrors)

    official_test = True

    def find_file(self, split: str) -> Optional[Path]:
        """The IDX file of ``split`` (``train`` or ``test``) in :attr:`root`, plain or ``.gz``; ``None`` if absent."""
        for name in (MNIST_FILES[split], MNIST_FILES[split] + ".gz"):
            if (self.root / name).is_file():
                return self.root / name
        return None

    def missing_files(self) -> list[str]:
        """The names of the image files that are not in :attr:`root`."""
        return [MNIST_FILES[s] for s in MNIST_FILES if self.find_file(s) is None]

    def prepare_data(self) -> None:
        """Download the missing files once per node when ``download`` is set."""
        if self.download and self.missing_files():
            self.fetch()
        super().prepare_data()

    def fetch(self) -> None:
        """Download every missing image file (``<name>.gz``) into :attr:`root`, trying each mirror in turn."""
        self.root.mkdir(parents=True, exist_ok=True)
        for name in self.missing_files():
            errors = []
            for mirror in self.mirrors:
                url = f"{mirror}{name}.gz"
                try:
                    with urllib.request.urlopen(url, timeout=30) as response:
                        blob = response.read()
                except (urllib.error.URLError, OSError) as err:
                    errors.append(f"{url}: {err}")
                    continue
                tmp = self.root / f"{name}.gz.part{os.getpid()}"
                tmp.write_bytes(blob)
                os.replace(tmp, self.root / f"{name}.gz")
                break
            else:
                raise RuntimeError(
                    f"MNISTImages: could not download {name}.gz (no network access?). Tried:\n  "
                    + "\n  ".join(errors)
                    + f"\nPlace {_expected_names()} in {self.root.resolve()} by hand and set download: false"
                )

    def load_images(self) -> tuple[Tensor, Tensor]:
        """The training and test images, ``N x 28 x 28`` in [0, 1]."""
        if self.download and self.missing_files():
            self.fetch()
        missing = self.missing_files()
        if missing:
            where = self.root.resolve()
            state = "does not exist" if not self.root.is_dir() else f"lacks {', '.join(missing)}"
            raise FileNotFoundError(
                f"MNISTImages: the folder {where} {state}. It must hold the MNIST image files {_expected_names()} "
                f"(IDX format, each plain or gzip-compressed with .gz appended). Set data.init_args.root to the "
                f"folder that has them, or data.init_args.download: true where there is network access"
            )
        loaded = []
        for split in ("train", "test"):
            path = self.find_file(split)
            array = read_idx(path)
            if array.ndim != 3:
                raise IDXFormatError(f"{path}: expected images N x H x W, got shape {array.shape}")
            scale = 255.0 if array.dtype == np.uint8 else 1.0
            loaded.append(torch.as_tensor(array.astype(np.float32) / scale))
        return loaded[0], loaded[1]


def _expected_names() -> str:
    return " and ".join(MNIST_FILES.values())
