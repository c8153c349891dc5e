"""Checkpoint files that are on disk when reported saved, and intact when loaded.

Three guards, each against a failure that otherwise passes in silence:

- :func:`check_checkpoint_folder`: before training, a checkpoint folder that cannot be created or written (a path
  below a regular file, a folder without write permission) is an error naming it, not a run that ends without
  checkpoints.
- :class:`VerifiedCheckpointIO`: every save is written, flushed to disk (``fsync``), moved into place atomically
  and read back; a save that did not happen raises :class:`CheckpointSaveError`. The pinned Lightning's own
  ``TorchCheckpointIO`` swallows a ``PermissionError`` while writing (``lightning_fabric.utilities.cloud_io``'s
  ``_atomic_save``), so a run could exit 0 with no checkpoint at all. ``lightning-amor`` installs this plugin.
- :func:`verify_checkpoint_archive`: ``torch.save`` writes a zip archive with a CRC-32 checksum of every record, but
  ``torch.load`` does not check them: a flipped bit in the weights loads as different weights. This function checks
  each record against its checksum, so a damaged file is refused by name.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_amor.module import BadCheckpointError

_CHUNK = 1 << 20  # bytes read at a time while checksumming
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip record's local header; its last two fields: name and extra lengths


class CheckpointSaveError(OSError):
    """A checkpoint could not be written, or did not read back as written (the run's exit status is 74)."""


class CheckpointFolderError(ValueError):
    """A checkpoint folder that cannot be created or written (found before training; exit status 2)."""


class DamagedCheckpointError(BadCheckpointError):
    """A checkpoint file whose content does not match the checksums stored in it (bit rot, a bad copy)."""


def verify_checkpoint_archive(path: Union[str, Path]) -> bool:
    """Check every record of the ``torch.save`` archive ``path`` against the CRC-32 stored for it.

    Reads the whole file once (about as fast as the disk). Archives written with
    ``torch.serialization.set_crc32_options(False)`` store no checksums: they pass with a warning.

    Returns:
        Whether the archive carried checksums (and so was verified).

    Raises:
        DamagedCheckpointError: a record does not match its checksum, or the archive's directory is damaged;
            the message names the file and the record.
    """
    checked = 0
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as file:
            for record in archive.infolist():
                if record.CRC == 0 and record.file_size > 0:
                    continue  # written without checksums: nothing to compare with
                if _record_crc(archive, file, record) != record.CRC:
                    raise DamagedCheckpointError(
                        f"the checkpoint {path} is damaged: its record {record.filename} does not match the checksum "
                        "stored with it (a flipped bit on disk, or a bad copy); use another checkpoint, or copy it "
                        "again from its source"
                    )
                checked += 1
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, struct.error) as err:
        raise DamagedCheckpointError(
            f"the checkpoint {path} is damaged: its zip structure cannot be read ({err}); use another checkpoint"
        ) from err
    if not checked:
        warnings.warn(f"the checkpoint {path} stores no checksums (written with CRC-32 turned off), so it was "
                      "loaded unverified", stacklevel=2)
    return checked > 0


def _record_crc(archive: zipfile.ZipFile, file: BinaryIO, record: zipfile.ZipInfo) -> int:
    """The CRC-32 of the bytes of ``record`` as they are on disk (``torch.save`` stores records uncompressed)."""
    if record.compress_type != zipfile.ZIP_STORED:
        crc = 0
        with archive.open(record) as handle:  # zipfile checks this record's CRC-32 itself (BadZipFile)
            while chunk := handle.read(_CHUNK):
                crc = zlib.crc32(chunk, crc)
        return crc
    file.seek(record.header_offset)
    header = file.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"the local header of {record.filename} is damaged")
    name_length, extra_length = _LOCAL_HEADER.unpack(header)[-2:]
    file.seek(record.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
    crc, remaining = 0, record.compress_size
    while remaining:
        chunk = file.read(min(_CHUNK, remaining))
        if not chunk:
            raise EOFError(f"{record.filename} ends early")
        crc, remaining = zlib.crc32(chunk, crc), remaining - len(chunk)
    return crc


def _first_existing(folder: Path) -> Path:
    """``folder`` or its nearest ancestor that exists."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_checkpoint_folder(folder: Union[str, Path]) -> None:
    """Raise :class:`CheckpointFolderError` naming ``folder`` unless checkpoints can be written there.

    The folder (and missing parents) is created, a small file is written in it and removed, and the folders this
    created are removed again, so that nothing is left behind by the check alone. Remote URLs pass unchecked.
    """
    if "://" in str(folder):
        return
    folder = Path(folder).absolute()
    existing = _first_existing(folder)
    if not existing.is_dir():
        raise CheckpointFolderError(
            f"cannot write checkpoints to {folder}: {existing} is a file, not a folder; move the file, or choose "
            "another folder (--trainer.default_root_dir, or the ModelCheckpoint's dirpath)"
        )
    created = [parent for parent in [folder, *folder.parents] if not parent.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lightning-amor-write-test-") as probe:
            probe.write(b"0")
            probe.flush()
    except OSError as err:
        raise CheckpointFolderError(
            f"cannot write checkpoints to {folder}: {err.strerror or err}; make it writable, or choose another "
            "folder (--trainer.default_root_dir, or the ModelCheckpoint's dirpath)"
        ) from err
    finally:
        for made in created:  # deepest first
            if made.is_dir():
                try:
                    made.rmdir()
                except OSError:
                    break  # another process put something there meanwhile: leave it


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (not possible on every platform and filesystem: best effort)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, with saves that either reach the disk intact or raise.

    A save serializes the checkpoint, writes it to a temporary file beside the target, flushes it to disk
    (``fsync``), renames it over the target (readers never see half a file) and reads it back: its size and every
    record's checksum must match. Any failure raises :class:`CheckpointSaveError` naming the file; no temporary
    file is left behind. Remote paths (``s3://...``) are saved by Lightning's own plugin, unverified.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        """Save ``checkpoint`` to ``path`` and verify it; raises :class:`CheckpointSaveError` when it is not there
        afterwards, complete and intact."""
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options; save to a remote URL to use them")
        target = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getbuffer()
        temporary: Optional[Path] = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            temporary = Path(name)
            with os.fdopen(handle, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
            temporary = None
        except OSError as err:
            raise CheckpointSaveError(
                f"could not save the checkpoint {target}: {err.strerror or err}; make its folder writable and free "
                "some disk space, or save elsewhere (--trainer.default_root_dir, or the ModelCheckpoint's dirpath)"
            ) from err
        finally:
            if temporary is not None:
                temporary.unlink(missing_ok=True)
        _fsync_folder(target.parent)
        self.verify_saved(target, len(data))

    @staticmethod
    def verify_saved(path: Union[str, Path], size: int) -> None:
        """Raise :class:`CheckpointSaveError` unless ``path`` holds ``size`` bytes that match their checksums."""
        path = Path(path)
        found = path.stat().st_size if path.is_file() else None
        if found != size:
            what = "is missing" if found is None else f"holds {found} bytes instead of {size}"
            raise CheckpointSaveError(f"the checkpoint {path} {what} after saving it; check the disk and its folder")
        try:
            verify_checkpoint_archive(path)
        except DamagedCheckpointError as err:
            raise CheckpointSaveError(f"the checkpoint {path} did not read back as written: {err}") from err


def checkpoint_folders(trainer: Trainer) -> list[str]:
    """The local folders ``trainer`` saves checkpoints to: those of its ``ModelCheckpoint`` callbacks with a
    ``dirpath`` and that of its :class:`~lightning_amor.preemption.PreemptionCheckpoint`, each once."""
    from lightning_amor.preemption import PreemptionCheckpoint  # it saves through this module

    folders = [str(cb.dirpath) for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    folders += [cb.checkpoint_folder(trainer) for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint)]
    return list(dict.fromkeys(folder for folder in folders if "://" not in folder))


def check_checkpoint_folders(trainer: Trainer) -> None:
    """:func:`check_checkpoint_folder` for each of :func:`checkpoint_folders` (on the first process only: the others
    save nothing)."""
    if trainer.is_global_zero:
        for folder in checkpoint_folders(trainer):
            check_checkpoint_folder(folder)


def use_verified_checkpoint_io(trainer: Trainer) -> None:
    """Give ``trainer`` a :class:`VerifiedCheckpointIO` in place of Lightning's default ``TorchCheckpointIO``; a
    checkpoint plugin of the user's own (``trainer.plugins``) is kept as it is."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = VerifiedCheckpointIO()
