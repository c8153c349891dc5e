"""``lightning-amor export``: write a trained amortizer as TorchScript and ONNX, checked on held-out contexts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional

from jsonargparse import ArgumentParser

from lightning_amor.export import FORMATS, SUFFIXES, ExportError, ExportMismatchError, check_export, export
from lightning_amor.module import BadCheckpointError


def build_parser() -> ArgumentParser:
    """The command's argument parser (``lightning-amor export --help`` prints it)."""
    parser = ArgumentParser(
        prog="lightning-amor export",
        description=(
            "Export the prediction x (B x ...) -> ŷ (B x n) of a trained model, inner gradient steps included, to "
            "TorchScript (amortizer.pt, torch.jit.load) and ONNX (amortizer.onnx, onnxruntime), then run every "
            "exported file against the eager model on the checkpoint's held-out test contexts and fail if any "
            "prediction differs by more than --atol."
        ),
        default_meta=False,
    )
    parser.add_argument("--ckpt", type=str, required=True,
                        help="a checkpoint written by `lightning-amor fit` (e.g. runs/.../checkpoints/last.ckpt)")
    parser.add_argument("--out", type=str, required=True, help="folder to write amortizer.pt / amortizer.onnx into")
    parser.add_argument("--format", type=Literal["torchscript", "onnx"], nargs="+", default=list(FORMATS),
                        help="formats to write (default: both)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="batch size of the example traced for export; with --static-batch, the only batch size "
                             "the files accept")
    parser.add_argument("--static-batch", action="store_true",
                        help="export for exactly --batch-size contexts per call instead of any batch size (needed "
                             "when the prediction draws seeded noise whose shape depends on the batch size)")
    parser.add_argument("--check-batch-sizes", type=int, nargs="+", default=[1, 7, 256],
                        help="batch sizes of held-out contexts the exported files are checked at (dynamic batch)")
    parser.add_argument("--atol", type=float, default=1e-5,
                        help="largest absolute difference allowed between exported and eager predictions")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    """Parse ``argv``, export and check; exits with a one-line error for bad checkpoints and unsupported models."""
    args = build_parser().parse_args(argv)
    try:
        run(args.ckpt, args.out, list(args.format), args.batch_size, args.static_batch,
            list(args.check_batch_sizes), args.atol)
    except BadCheckpointError as err:  # bad input: exit status 2, as the other subcommands
        print(f"lightning-amor export: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    except (ExportError, ExportMismatchError, ValueError) as err:
        raise SystemExit(f"lightning-amor export: error: {err}") from err


def run(ckpt: str, out: str, formats: list[str], batch_size: int, static_batch: bool, check_batch_sizes: list[int],
        atol: float) -> dict[str, float]:
    """Export the checkpoint's model in ``formats`` into ``out`` and check each file; returns file -> max error."""
    from lightning_amor.loading import load_datamodule, load_module

    if batch_size < 1 or min(check_batch_sizes) < 1:
        raise ValueError(f"--batch-size and --check-batch-sizes must be at least 1, got {batch_size} and "
                         f"{check_batch_sizes}")
    module = load_module(ckpt, option="--ckpt")
    data = load_datamodule(ckpt, option="--ckpt")
    if data is None:
        raise BadCheckpointError(f"the checkpoint {ckpt} records no data module, so there are no held-out contexts to "
                                 "check the export on; export it from Python with lightning_amor.export")
    needed = max(batch_size, *check_batch_sizes)
    try:
        contexts = data.fixed_set("test", max(data.test_size, needed), with_targets=False)["x"]
    except ValueError as err:
        raise ExportError(f"the checkpoint's data module cannot give {needed} held-out test contexts ({err}); lower "
                          "--check-batch-sizes and --batch-size") from err
    contexts = contexts[: max(needed, 256)]  # static exports are checked on consecutive batches of these
    print(f"model: {type(module).__name__} ({type(module.amortizer).__name__} on {type(module.objective).__name__}) "
          f"from {ckpt}")
    print(f"held-out contexts: the data module's test split ({type(data).__name__}, seed {data.seed}), "
          f"shape {tuple(contexts.shape)}")
    errors = {}
    for fmt in formats:
        path = Path(out) / f"amortizer{SUFFIXES[fmt]}"
        export(module, path, contexts[:batch_size], fmt, dynamic_batch=not static_batch)
        error = check_export(path, module, contexts, atol, check_batch_sizes)
        errors[str(path)] = error
        batches = f"batch {batch_size} only (static)" if static_batch else f"batches {sorted(set(check_batch_sizes))}"
        print(f"wrote {path} ({fmt}, {path.stat().st_size / 1024:.0f} KiB); max |exported - eager| = {error:.3g} "
              f"<= {atol:g} on {batches}")
    return errors
