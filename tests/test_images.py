"""The IDX reader and the image data modules (MNIST from IDX files, scikit-learn's digits)."""

from __future__ import annotations

import gzip
import io
import struct
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from datamodules import DigitsImages, MNISTImages
from datamodules.images import IDXFormatError, read_idx, write_idx
from lightning_amor import MLP
from lightning_amor.apps.vae import ELBOObjective


def fake_mnist(folder, train: int = 40, test: int = 20, size: int = 28, gz: bool = True, seed: int = 0):
    """Write MNIST-like IDX image files (random uint8 images) into ``folder``; returns (train, test) arrays."""
    rng = np.random.default_rng(seed)
    images = {"train": rng.integers(0, 256, (train, size, size), dtype=np.uint8),
              "test": rng.integers(0, 256, (test, size, size), dtype=np.uint8)}
    suffix = ".gz" if gz else ""
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", images["train"])
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", images["test"])
    return images["train"], images["test"]


def attached(data, pixels: int = 64):
    """``data`` with an ELBO objective attached (a data module needs one outside a Trainer)."""
    data.attach(ELBOObjective(MLP(2, pixels, hidden=[4]), latent_dim=2))
    return data


def rows(images: torch.Tensor) -> set[bytes]:
    """Each image as bytes, to compare sets of images."""
    return {bytes(i.numpy().tobytes()) for i in images}


# --- the IDX reader ---------------------------------------------------------------------------------

def test_reads_a_hand_made_idx_file(tmp_path):
    """Bytes laid out by hand as the format describes: 00 00 08 03, three big-endian sizes, the data."""
    data = bytes(range(12))
    blob = bytes([0, 0, 0x08, 3]) + struct.pack(">III", 2, 2, 3) + data
    (tmp_path / "plain").write_bytes(blob)
    (tmp_path / "zipped").write_bytes(gzip.compress(blob))
    for name in ("plain", "zipped"):
        array = read_idx(tmp_path / name)
        assert array.dtype == np.uint8 and array.shape == (2, 2, 3)
        assert array[1, 0, 2] == 8 and array[0, 1, 0] == 3


def test_reads_big_endian_types(tmp_path):
    blob = bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + struct.pack(">iii", -1, 256, 70000)
    (tmp_path / "ints").write_bytes(blob)
    np.testing.assert_array_equal(read_idx(tmp_path / "ints"), [-1, 256, 70000])
    blob = bytes([0, 0, 0x0D, 2]) + struct.pack(">II", 1, 2) + struct.pack(">ff", 0.5, -2.25)
    (tmp_path / "floats").write_bytes(blob)
    np.testing.assert_array_equal(read_idx(tmp_path / "floats"), [[0.5, -2.25]])


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_write_then_read_round_trips(tmp_path, dtype, suffix):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype) if dtype != np.uint8 else np.arange(24, dtype=dtype)
    path = write_idx(tmp_path / f"a{suffix}", array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "not an IDX file"),
        (b"PK\x03\x04", "not an IDX file"),
        (bytes([0, 0, 8, 3]) + struct.pack(">II", 2, 2), "truncated IDX header"),
        (bytes([0, 0, 8, 2]) + struct.pack(">II", 2, 3) + bytes(5), r"announces shape \(2, 3\)"),
        (bytes([0, 0, 8, 1]) + struct.pack(">I", 1) + bytes(2), "holds 10 bytes"),
        (b"\x1f\x8b\x08\x00garbage", "cannot be decompressed"),
    ],
    ids=["bad-type", "zip-file", "short-header", "truncated-data", "trailing-data", "bad-gzip"],
)
def test_malformed_files_are_named_in_the_error(tmp_path, blob, message):
    path = tmp_path / "broken-idx"
    path.write_bytes(blob)
    with pytest.raises(IDXFormatError, match=message) as error:
        read_idx(path)
    assert str(path) in str(error.value)


# --- MNIST from a folder ----------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_mnist_reads_the_folder_and_holds_out_validation_images(tmp_path, gz):
    train, test = fake_mnist(tmp_path, gz=gz)
    data = MNISTImages(root=str(tmp_path), batch_size=8, val_size=10, test_size=20)
    assert data.images("train").shape == (30, 1, 28, 28)
    assert data.images("val").shape == (10, 1, 28, 28)
    torch.testing.assert_close(data.images("test"), torch.as_tensor(test[:, None] / 255.0, dtype=torch.float32))
    all_train = rows(torch.as_tensor(train[:, None] / 255.0, dtype=torch.float32))
    assert rows(data.images("train")) | rows(data.images("val")) == all_train
    assert not rows(data.images("train")) & rows(data.images("val"))


def test_mnist_resizes_and_keeps_values_in_the_unit_interval(tmp_path):
    fake_mnist(tmp_path, train=12, test=4)
    data = MNISTImages(root=str(tmp_path), resize=32, batch_size=4, val_size=4, test_size=4)
    for split in ("train", "val", "test"):
        images = data.images(split)
        assert images.shape[1:] == (1, 32, 32)
        assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert data.image_shape == (1, 32, 32)


def test_missing_mnist_files_name_the_folder_and_the_files(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        MNISTImages(root=str(tmp_path / "nowhere")).images("train")
    message = str(error.value)
    assert str((tmp_path / "nowhere").resolve()) in message and "does not exist" in message
    assert "train-images-idx3-ubyte" in message and "t10k-images-idx3-ubyte" in message
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="lacks t10k-images-idx3-ubyte"):
        MNISTImages(root=str(tmp_path)).images("train")


def test_download_without_network_fails_clearly(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    data = MNISTImages(root=str(tmp_path / "mnist"), download=True)
    with pytest.raises(RuntimeError, match="could not download train-images-idx3-ubyte.gz") as error:
        data.prepare_data()
    assert "no route to host" in str(error.value) and str((tmp_path / "mnist").resolve()) in str(error.value)


def test_download_fetches_the_missing_files(tmp_path, monkeypatch):
    """The download path, served from generated files instead of the network."""
    source = tmp_path / "server"
    train, _ = fake_mnist(source, train=9, test=3)
    requested = []

    def serve(url, timeout=None):
        requested.append(url)
        return io.BytesIO((source / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    data = MNISTImages(root=str(tmp_path / "mnist"), download=True, batch_size=2, val_size=3, test_size=3)
    attached(data, 28 * 28).prepare_data()
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz"
    ]
    assert len(requested) == 2 and requested[0].startswith(data.mirrors[0])
    assert data.images("train").shape[0] + data.images("val").shape[0] == 9


def test_sizes_beyond_the_images_are_refused(tmp_path):
    fake_mnist(tmp_path, train=20, test=5)
    with pytest.raises(ValueError, match="batch_size=16 exceeds the 12 training images"):
        attached(MNISTImages(root=str(tmp_path), batch_size=16, val_size=8, test_size=5), 784).setup("fit")
    with pytest.raises(ValueError, match="test_size=6 exceeds the 5 held-out test images"):
        attached(MNISTImages(root=str(tmp_path), batch_size=4, val_size=8, test_size=6), 784).setup("test")
    with pytest.raises(ValueError, match="leave none of the 20 training images"):
        MNISTImages(root=str(tmp_path), batch_size=4, val_size=20, test_size=5).images("train")


# --- the bundled digits -----------------------------------------------------------------------------

def test_digits_splits_are_disjoint_and_cover_the_data_set():
    data = DigitsImages(batch_size=32, val_size=100, test_size=200)
    train, val, test = data.images("train"), data.images("val"), data.images("test")
    assert (train.shape[0], val.shape[0], test.shape[0]) == (1497, 100, 200)
    assert train.shape[1:] == (1, 8, 8)
    assert float(train.min()) == 0.0 and float(train.max()) == 1.0
    assert len(rows(train) & rows(val)) == 0 and len(rows(train) & rows(test)) == 0
    # the same split whatever the training seed
    torch.testing.assert_close(DigitsImages(seed=5, val_size=100, test_size=200).images("test"), test)


def test_digits_training_batches_are_fresh_distinct_training_images():
    data = attached(DigitsImages(batch_size=64, val_size=100, test_size=200))
    data.setup("fit")
    first = next(iter(data.train_dataloader()))["x"]
    again = next(iter(data.train_dataloader()))["x"]
    assert first.shape == (64, 1, 8, 8)
    torch.testing.assert_close(first, again)  # seeded by (seed, batch index)
    batches = iter(data.train_dataloader())
    next(batches)
    assert not torch.equal(next(batches)["x"], first)
    assert rows(first) <= rows(data.images("train")) and len(rows(first)) == 64 - _duplicates(data)
    val = next(iter(data.val_dataloader()))["x"]
    torch.testing.assert_close(val, data.images("val"))


def _duplicates(data: DigitsImages) -> int:
    """Training images that occur twice in the data set would make fewer distinct rows; there are none here."""
    return data.images("train").shape[0] - len(rows(data.images("train")))


def test_digits_resize_to_32():
    data = DigitsImages(resize=32, val_size=10, test_size=10)
    assert data.image_shape == (1, 32, 32)
