"""``lightning-amor solve``: amortize-then-refine a file of contexts with a trained checkpoint, with certificates.

Reads contexts (``.pt``, ``.npy`` or ``.csv``, one context per row), predicts each solution with the checkpoint's
model, certifies it (objective value, projected-gradient residual, feasibility), refines it with the model's
:class:`~lightning_amor.inference.Fallback` solver where the residual exceeds the tolerance, solves
out-of-distribution contexts from scratch, and writes the solutions with their certificates. Exits non-zero only
when an input file cannot be used; contexts that cannot be solved are reported by index with the reason.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from jsonargparse import ActionYesNo, ArgumentParser
from torch import Tensor

from lightning_amor.inference import Calibration, InferenceResult, calibrate
from lightning_amor.objective import Context, context_batch_size

FORMATS = (".pt", ".npy", ".csv")


class ContextFileError(ValueError):
    """A contexts file that cannot be used: missing, unreadable, of another shape than the model expects."""


def build_parser() -> ArgumentParser:
    """The ``solve`` subcommand's arguments."""
    parser = ArgumentParser(
        prog="lightning-amor solve",
        description=(
            "Solve a file of contexts with a trained amortizer: each prediction is certified (objective value, "
            "projected-gradient residual ||y - P(y - grad f(y))||, feasibility); predictions whose residual "
            "exceeds the tolerance are refined by the recipe's solver started from them, and contexts out of "
            "distribution (the prediction's residual, or the context's Mahalanobis distance to the validation "
            "contexts, above a quantile of those on the validation set times a margin) are solved from scratch "
            "instead. Every context gets a row; those that "
            "cannot be solved (NaN in the context, a solver error) are reported with the reason. The defaults of "
            "the tolerance and the OOD settings come from the recipe (model.init_args.inference)."
        ),
        exit_on_error=True,
    )
    parser.add_argument("--ckpt", type=str, required=True, help="A checkpoint written by `lightning-amor fit`.")
    parser.add_argument(
        "--contexts", type=str, required=True,
        help="The contexts: a .pt file (a N x ... tensor, or a dict of tensors leading with N), a .npy array "
        "(N x ...), or a .csv file with one context per row (numbers only, an optional header row). A row "
        "with fewer dimensions than the model's context is reshaped to it when the counts of numbers match.",
    )
    parser.add_argument(
        "--out", type=Optional[str], default=None,
        help="Where to write the solutions and certificates: .csv (columns y_0..y_{n-1}, then the certificate), "
        ".npy (a structured array with the same columns) or .pt (a dict of tensors and lists). Default: none, "
        "only the summary is printed.",
    )
    parser.add_argument("--tolerance", type=Optional[float], default=None,
                        help="The largest accepted residual (default: the recipe's inference.tolerance, or one the "
                        "model's dtype can reach: 1e-3 in float32, 1e-4 in float64).")
    parser.add_argument("--refine", action=ActionYesNo(no_prefix="no-"), default=True,
                        help="Refine predictions whose residual exceeds the tolerance (--no-refine: only report).")
    parser.add_argument("--fallback", action=ActionYesNo(no_prefix="no-"), default=True,
                        help="Solve out-of-distribution contexts from scratch (--no-fallback: refine them too).")
    parser.add_argument("--ood_quantile", "--ood-quantile", type=Optional[float], default=None,
                        help="The quantile level of the validation residuals (and context distances) behind the OOD "
                        "thresholds.")
    parser.add_argument("--ood_margin", "--ood-margin", type=Optional[float], default=None,
                        help="The factor (>= 1) on those quantiles.")
    parser.add_argument("--ood_threshold", "--ood-threshold", type=Optional[float], default=None,
                        help="Use this OOD threshold on the residual instead of the calibrated one.")
    parser.add_argument(
        "--calibrate", action=ActionYesNo(no_prefix="no-"), default=True,
        help="When the checkpoint has no calibration of its own weights (older versions, or a last.ckpt saved "
        "between validations), calibrate on the validation split of the data module it was trained with.",
    )
    parser.add_argument("--batch_size", "--batch-size", type=Optional[int], default=None,
                        help="Contexts per call of the model and the solvers, padded to exactly this many so that no "
                        "context's answer depends on the others (default: the recipe's inference.batch_size).")
    parser.add_argument("--device", type=str, default="cpu", help="cpu, cuda, cuda:1, ...")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    """Run ``lightning-amor solve`` with the arguments ``argv`` (those after ``solve``)."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[2:] if argv is None else argv)
    from lightning_amor.module import BadCheckpointError

    try:
        run(args)
    except (ContextFileError, BadCheckpointError) as err:
        print(f"lightning-amor solve: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def run(args: Any) -> InferenceResult:
    """Solve the contexts file of the parsed ``args`` and write the results; raises :class:`ContextFileError` (or
    :class:`~lightning_amor.module.BadCheckpointError`) for unusable input files."""
    from lightning_amor.loading import load_datamodule, load_module

    out = Path(args.out) if args.out else None
    if out is not None:
        check_output(out, args.contexts)  # before any work: a solve must never be lost at the end
    contexts = read_contexts(args.contexts)
    module = load_module(args.ckpt, map_location=args.device, option="--ckpt")
    datamodule = _datamodule(load_datamodule, args.ckpt)
    contexts = match_shape(contexts, _context_shape(datamodule), args.contexts)

    changes = {k: getattr(args, k) for k in ("tolerance", "ood_quantile", "ood_margin", "batch_size")
               if getattr(args, k) is not None}
    policy = module.inference.replace(refine=args.refine, fallback=args.fallback, **changes)
    calibration = module.calibration
    if args.fallback and args.ood_threshold is None and (calibration is None or not calibration.matches_weights):
        calibration = _recalibrate(module, datamodule, calibration, args.calibrate, policy.batch_size)

    result = policy(module, contexts, calibration=calibration, threshold=args.ood_threshold)
    print(f"lightning-amor solve: {args.contexts} with {args.ckpt}")
    print(result.summary())
    if out is not None:
        write_results(result, out)
        print(f"wrote {len(result)} rows to {out}")
    else:
        print("(no --out given: nothing written)")
    return result


def check_output(out: Path, contexts: Union[str, Path]) -> None:
    """Refuse an ``--out`` path that could not be written, or that would overwrite the contexts file, before any
    work is done.

    Raises:
        ContextFileError: naming the path and what is wrong (unknown format, the contexts file itself, a folder,
            a folder that cannot be created or written).
    """
    if out.suffix not in FORMATS:
        raise ContextFileError(f"--out {out}: unknown format {out.suffix!r}; use one of {', '.join(FORMATS)}")
    if out.exists() and Path(contexts).exists() and out.resolve() == Path(contexts).resolve():
        raise ContextFileError(f"--out {out} is the contexts file itself; write the results to another file")
    if out.is_dir():
        raise ContextFileError(f"--out {out} is a directory; name a file such as {out / ('solutions' + out.suffix)}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise ContextFileError(f"--out {out} cannot be written ({reason}); choose a writable folder") from err
    if out.exists() and not os.access(out, os.W_OK):
        raise ContextFileError(f"--out {out} exists and is read-only; choose another file or make it writable")


def _datamodule(load_datamodule: Any, ckpt: str) -> Optional[Any]:
    try:
        return load_datamodule(ckpt, option="--ckpt")
    except Exception as err:  # noqa: BLE001 - without it, only the shape check and the calibration are skipped
        print(f"note: the checkpoint's data module cannot be built ({type(err).__name__}: {err}); the contexts' "
              "shape is not checked against it", file=sys.stderr)
        return None


def _context_shape(datamodule: Optional[Any]) -> Optional[Union[tuple[int, ...], dict[str, tuple[int, ...]]]]:
    """The shape of one context of the training distribution (without the batch dimension), if it can be drawn."""
    if datamodule is None:
        return None
    try:
        sample = datamodule.sample(1, torch.Generator().manual_seed(0))
    except Exception as err:  # noqa: BLE001 - e.g. a data set whose files are not on this machine
        print(f"note: no context could be drawn from the checkpoint's data module ({type(err).__name__}: {err}); "
              "the contexts' shape is not checked", file=sys.stderr)
        return None
    if isinstance(sample, Tensor):
        return tuple(sample.shape[1:])
    return {k: tuple(v.shape[1:]) for k, v in sample.items()}


def _recalibrate(
    module: Any, datamodule: Optional[Any], saved: Optional[Calibration], allowed: bool, batch_size: int
) -> Optional[Calibration]:
    why = "has no calibration" if saved is None else f"was calibrated at step {saved.step}, not on its own weights"
    if not allowed or datamodule is None:
        print(f"note: the checkpoint {why}; " + (
            "using it as it is" if saved is not None else "out-of-distribution detection is off"
        ) + ("" if allowed else " (--no-calibrate)") + "; pass --ood_threshold to set one", file=sys.stderr)
        return saved
    try:
        x = datamodule.fixed_set("val", datamodule.val_size, with_targets=False)["x"]
        calibration = calibrate(module, x, batch_size)
    except Exception as err:  # noqa: BLE001 - the solve still runs, with what the checkpoint has
        print(f"note: the checkpoint {why}, and calibrating on its validation split failed ({type(err).__name__}: "
              f"{err})", file=sys.stderr)
        return saved
    print(f"note: the checkpoint {why}; calibrated on the {calibration.count} validation contexts of its data module",
          file=sys.stderr)
    return calibration


# --- reading ---------------------------------------------------------------------------------------------------------


def read_contexts(path: Union[str, Path]) -> Context:
    """The contexts in ``path`` (.pt, .npy or .csv) as a float tensor ``N x ...`` (or a dict of them, from .pt).

    Raises:
        ContextFileError: naming the file and what is wrong (missing, unknown format, unreadable, not numeric,
            empty, ragged CSV rows, a non-numeric CSV cell by row and column).
    """
    file = Path(path)
    if not file.is_file():
        where = "is a directory, not a file" if file.is_dir() else "does not exist"
        raise ContextFileError(f"the contexts file {path} {where}")
    suffix = file.suffix.lower()
    if suffix == ".csv":
        x: Context = _read_csv(file)
    elif suffix == ".npy":
        x = _read_npy(file)
    elif suffix == ".pt":
        x = _read_pt(file)
    else:
        raise ContextFileError(f"the contexts file {path} has an unknown format {file.suffix!r}; use one of "
                               f"{', '.join(FORMATS)}")
    if context_batch_size(x) == 0:
        raise ContextFileError(f"the contexts file {path} holds no contexts")
    return x


def _read_csv(file: Path) -> Tensor:
    with open(file, newline="") as handle:
        lines = [(number, row) for number, row in enumerate(csv.reader(handle), start=1)
                 if any(cell.strip() for cell in row)]
    if not lines:
        raise ContextFileError(f"the contexts file {file} is empty")
    header: Optional[list[str]] = None
    if not any(_is_number(cell) for cell in lines[0][1]):
        header = [cell.strip() for cell in lines[0][1]]
        lines = lines[1:]
        if not lines:
            raise ContextFileError(f"the contexts file {file} has a header row but no contexts")
    width = len(header) if header is not None else len(lines[0][1])
    rows = []
    for number, row in lines:
        if len(row) != width:
            raise ContextFileError(
                f"{file}, line {number}: {len(row)} cells, but {'the header' if header else 'the first row'} has "
                f"{width}; every row must hold one whole context"
            )
        values = []
        for column, cell in enumerate(row, start=1):
            try:
                values.append(float(cell))
            except ValueError:
                name = f" ({header[column - 1]!r})" if header else ""
                what = "an empty cell" if not cell.strip() else f"{cell.strip()!r}, not a number"
                raise ContextFileError(f"{file}, line {number}, column {column}{name}: {what}; write a number (nan "
                                       "marks a missing value, and such a context is reported as failed)") from None
        rows.append(values)
    return torch.tensor(rows, dtype=torch.get_default_dtype())


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _read_npy(file: Path) -> Tensor:
    try:
        array = np.load(file, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - whatever numpy cannot read is reported the same way
        raise ContextFileError(f"the contexts file {file} cannot be read as a .npy array: {err}") from err
    return _as_tensor(array, file)


def _read_pt(file: Path) -> Context:
    try:
        content = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ContextFileError(f"the contexts file {file} cannot be read by torch.load: {err}") from err
    if isinstance(content, Tensor):
        return _as_tensor(content, file)
    if isinstance(content, dict) and content and all(isinstance(v, Tensor) for v in content.values()):
        x = {str(k): _as_tensor(v, file, f" (key {k!r})") for k, v in content.items()}
        try:
            context_batch_size(x)
        except ValueError as err:
            raise ContextFileError(f"the contexts file {file}: {err}") from err
        return x
    raise ContextFileError(f"the contexts file {file} holds a {type(content).__name__}; save a N x ... tensor of "
                           "contexts (or a dict of tensors that all lead with N)")


def _as_tensor(data: Union[np.ndarray, Tensor], file: Path, where: str = "") -> Tensor:
    if isinstance(data, np.ndarray) and data.dtype.kind not in "biuf":  # strings, objects, records, dates ...
        raise ContextFileError(
            f"the contexts file {file}{where} holds {data.dtype} values ({_numpy_kind(data.dtype)}); contexts are "
            "real numbers: save a float array, e.g. np.save(path, x.astype(np.float32))"
        )
    tensor = torch.as_tensor(data) if isinstance(data, np.ndarray) else data
    if tensor.dtype == torch.bool or tensor.is_complex() or not (tensor.is_floating_point() or _integer(tensor)):
        raise ContextFileError(
            f"the contexts file {file}{where} holds {tensor.dtype} values; contexts are real numbers"
        )
    if tensor.dim() == 0:
        raise ContextFileError(f"the contexts file {file}{where} holds a single number; write N x d contexts")
    if tensor.dim() == 1:
        tensor = tensor[:, None]  # one number per context
    return tensor.to(torch.get_default_dtype()) if not tensor.is_floating_point() else tensor


def _numpy_kind(dtype: np.dtype) -> str:
    kinds = {"U": "text", "S": "bytes", "O": "Python objects", "V": "records", "M": "dates", "m": "time spans",
             "c": "complex numbers"}
    return kinds.get(dtype.kind, "not real numbers")


def _integer(tensor: Tensor) -> bool:
    return tensor.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def match_shape(
    x: Context, shape: Optional[Union[tuple[int, ...], dict[str, tuple[int, ...]]]], path: Union[str, Path]
) -> Context:
    """Check the contexts ``x`` against the shape of one context of the training distribution, reshaping rows of
    the same count of numbers (a CSV row of 64 pixels for 1 x 8 x 8 images); ``None``: unknown, no check."""
    if shape is None:
        return x
    if isinstance(shape, dict) or not isinstance(x, Tensor):
        if not isinstance(shape, dict) or not isinstance(x, dict) or set(shape) != set(x):
            want = sorted(shape) if isinstance(shape, dict) else "one tensor"
            got = sorted(x) if isinstance(x, dict) else "one tensor"
            raise ContextFileError(f"the contexts file {path} holds {got}, but the model's contexts are {want}")
        return {k: match_shape(v, shape[k], f"{path} (key {k!r})") for k, v in x.items()}
    if tuple(x.shape[1:]) == shape:
        return x
    numbers, expected = math.prod(x.shape[1:]), math.prod(shape)
    if numbers != expected:
        raise ContextFileError(
            f"the contexts file {path} has {numbers} numbers per context (shape {tuple(x.shape[1:])}), but the "
            f"model expects {expected} (shape {shape}); write one context per row"
        )
    return x.reshape(x.shape[0], *shape)


# --- writing ---------------------------------------------------------------------------------------------------------


def write_results(result: InferenceResult, path: Union[str, Path]) -> None:
    """Write the solutions and certificates: .csv, .npy (structured array) or .pt (dict), by ``path``'s suffix.

    Written to a temporary file beside ``path`` and then renamed over it, so an interrupted write never leaves a
    truncated file under the final name."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise ContextFileError(f"--out {path}: unknown format {path.suffix!r}; use one of {', '.join(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        _write(result, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write(result: InferenceResult, path: Path) -> None:
    columns = result.columns()
    if path.suffix == ".pt":
        saved: dict[str, Any] = {k: (v.cpu() if isinstance(v, Tensor) else list(v)) for k, v in columns.items()}
        saved.update(y=result.y.cpu(), tolerance=result.tolerance, threshold=result.threshold,
                     distance_threshold=result.distance_threshold)
        torch.save(saved, path)
        return
    arrays = {k: (v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v, dtype=str))
              for k, v in columns.items()}
    if path.suffix == ".npy":
        dtype = [(k, a.dtype if a.dtype.kind != "U" else f"<U{max(1, a.dtype.itemsize // 4)}")
                 for k, a in arrays.items()]
        table = np.zeros(len(result), dtype=dtype)
        for name, array in arrays.items():
            table[name] = array
        with open(path, "wb") as handle:  # np.save on a name would append ".npy" to the temporary name
            np.save(handle, table, allow_pickle=False)
        return
    if path.suffix == ".csv":
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(list(arrays))
            for i in range(len(result)):
                writer.writerow([_cell(array[i]) for array in arrays.values()])


def _cell(value: Any) -> str:
    if isinstance(value, (np.floating, float)):
        return repr(float(value))
    if isinstance(value, np.bool_):
        return str(bool(value)).lower()
    return str(value)
