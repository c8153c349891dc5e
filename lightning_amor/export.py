"""Export a trained amortizer x -> ŷ to TorchScript and ONNX, and check the exported file against the eager model.

The exported function is ``forward`` of :class:`~lightning_amor.module.AmortizedModule` in eval mode:
contexts ``B x ...`` (a tensor) to predictions ``B x n``. Semi-amortized models take gradient steps on f inside
that function, which ``torch.jit.trace`` and the ONNX exporters cannot capture from autograd calls. The export
therefore first runs the prediction under :func:`torch.fx.experimental.proxy_tensor.make_fx`, which records every
operation autograd performs (the inner gradients included) as a graph of plain aten operations, with a symbolic
batch size; the model's parameters, those of the objective (a VAE decoder) included, become constants of that
graph. The graph is then compiled by ``torch.jit.script`` (TorchScript) or exported by
``torch.onnx.export(dynamo=True)`` with a dynamic batch axis (ONNX).

Random numbers drawn at inference cannot be reproduced by an exported graph in general. Draws from an explicitly
seeded ``torch.Generator`` (e.g. SA-VAE's seeded inner noise in evaluation, one draw shared by the batch) are frozen
as constants, which is exact; where their shape depends on the batch size they fix it (``dynamic_batch=False``).
Draws from the global generator are refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_amor.module import AmortizedModule
from lightning_amor.runtime import evaluation_mode
from lightning_amor.structure import Structure

FORMATS = ("torchscript", "onnx")
SUFFIXES = {"torchscript": ".pt", "onnx": ".onnx"}
METADATA_KEY = "lightning_amor"
"""The key of the JSON metadata stored in exported files (TorchScript extra file / ONNX metadata property)."""

# Python-level random functions whose draws with an explicit, seeded generator are frozen into constants.
_RANDOM_FUNCTIONS = (
    torch.randn, torch.rand, torch.randint, torch.randperm, torch.normal, torch.bernoulli, torch.multinomial,
    torch.randn_like, torch.rand_like, torch.randint_like, torch.poisson, Tensor.normal_, Tensor.uniform_,
    Tensor.bernoulli_, Tensor.random_, Tensor.exponential_, Tensor.geometric_, Tensor.log_normal_, Tensor.cauchy_,
)


class ExportError(RuntimeError):
    """A model or context that cannot be exported (unsupported input, randomness, or a tracing failure)."""


class ExportMismatchError(AssertionError):
    """The exported file's predictions differ from the eager model's by more than the tolerance."""


def _check_example(example: Any) -> Tensor:
    if isinstance(example, Tensor):
        if example.dim() < 2 or example.shape[0] < 1:
            raise ExportError(
                f"the example contexts must be a batch B x ... with B >= 1 and at least one feature dimension, got "
                f"shape {tuple(example.shape)}"
            )
        if not example.is_floating_point():
            raise ExportError(f"the example contexts must be floating point, got {example.dtype}")
        return example
    kind = "dict" if isinstance(example, dict) else type(example).__name__
    raise ExportError(
        f"only tensor contexts can be exported (x: B x ... -> ŷ: B x n), got a {kind}; an exported graph takes one "
        "input tensor: concatenate the context's parts into one tensor in the data module and split them again in "
        "the objective and networks"
    )


class _FreezeSeededDraws(TorchFunctionMode):
    """Executes random draws that name an explicit ``generator`` outside the trace, so they become constants."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func in _RANDOM_FUNCTIONS and kwargs.get("generator") is not None:
            from torch._subclasses.fake_tensor import unset_fake_temporarily
            from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

            symbolic = any(isinstance(a, torch.SymInt) for a in torch.utils._pytree.tree_leaves((args, kwargs)))
            if symbolic:
                raise ExportError(
                    f"the model draws seeded random numbers ({func.__name__} with a torch.Generator) whose values "
                    "depend on the batch size (e.g. noise drawn per batch element), which a graph with a dynamic "
                    "batch cannot reproduce; export it with a fixed batch size (dynamic_batch=False, or "
                    "`lightning-amor export --static-batch` with --batch-size the batch it will serve)"
                )
            # a real tensor (not a symbolic tracer's fake one), recorded in the graph as a constant
            with disable_proxy_modes_tracing(), unset_fake_temporarily():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def trace_example(example: Tensor, dynamic_batch: bool) -> Tensor:
    """The contexts to trace with: ``example`` itself for a fixed batch; for a dynamic one, its rows repeated or cut
    to a batch size of at least 2 that differs from every feature size (the tracer would otherwise tie the batch to
    the value 1 or to a feature dimension of the same size)."""
    example = _check_example(example)
    batch = example.shape[0]
    if not dynamic_batch:
        return example
    size = max(batch, 2)
    while size in example.shape[1:]:
        size += 1
    return example if size == batch else example[torch.arange(size) % batch]


def _random_nodes(graph: torch.fx.Graph) -> list[str]:
    """Names of the graph's operations that draw from the global random generator."""
    found = []
    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if torch.Tag.nondeterministic_seeded in node.target.tags:
                found.append(str(node.target))
    return found


def trace_inference(module: AmortizedModule, example: Tensor, dynamic_batch: bool = True) -> torch.fx.GraphModule:
    """The eval-mode prediction ``x -> module(x)`` as a graph of aten operations (inner gradient steps included).

    Args:
        module: the trained model (any :class:`~lightning_amor.AmortizedModule`).
        example: example contexts ``B x ...`` (their feature shape and dtype are fixed in the graph).
        dynamic_batch: trace with a symbolic batch size (the graph then runs for any B); otherwise for exactly B.

    Returns:
        A ``GraphModule`` mapping ``B x ...`` contexts to ``B x n`` predictions, with the parameters as constants.

    Raises:
        ExportError: non-tensor contexts, random draws that cannot be reproduced, or a tracing failure.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    example = trace_example(example, dynamic_batch)
    freeze = _FreezeSeededDraws()

    def predict(x):  # no annotations: the graph's code would copy them, and TorchScript cannot read them
        with freeze:
            y = module(x)
        if not isinstance(y, Tensor) or y.dim() != 2:
            raise ExportError(f"{type(module).__name__}.forward must return B x n predictions, got {type(y).__name__}")
        return y

    mode = "symbolic" if dynamic_batch else "real"
    with evaluation_mode(module), torch.no_grad():
        try:
            graph = make_fx(predict, tracing_mode=mode, _allow_non_fake_inputs=True)(example)
        except ExportError:
            raise
        except Exception as err:  # noqa: BLE001 - any tracing failure is reported with the model's name
            hint = "; try a fixed batch size (dynamic_batch=False / --static-batch)" if dynamic_batch else ""
            raise ExportError(
                f"cannot trace the prediction of {type(module).__name__} ({type(module.amortizer).__name__} on "
                f"{type(module.objective).__name__}) for export: {type(err).__name__}: {err}{hint}"
            ) from err
    random = _random_nodes(graph.graph)
    if random:
        raise ExportError(
            f"the prediction of {type(module).__name__} draws fresh random numbers in eval mode ({sorted(set(random))}"
            "), which an exported graph cannot reproduce; make the eval-mode prediction deterministic (e.g. fixed, "
            "seeded noise in the objective) before exporting"
        )
    from torch._functorch.compile_utils import strip_overloads

    strip_overloads(graph)  # TorchScript calls ops by packet (aten.t), not overload (aten.t.default)
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return graph


# torch's ScalarType codes, in order (TorchScript represents a dtype by its code)
_SCRIPT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
                  torch.float64, torch.complex32, torch.complex64, torch.complex128, torch.bool)


class _CheckedInput(nn.Module):
    """Checks the contexts' shape and dtype with a clear message, then runs the traced graph (TorchScript)."""

    def __init__(self, graph: nn.Module, feature_shape: list[int], batch: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.graph = graph
        self.feature_shape = feature_shape
        self.batch = batch  # -1: any batch size
        self.dtype = dtype
        # TorchScript formats a dtype as its integer code ("6"); the messages use these names instead
        self.dtype_name = str(dtype).removeprefix("torch.")
        self.dtype_names = {int(code): str(t).removeprefix("torch.") for code, t in enumerate(_SCRIPT_DTYPES)}

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != len(self.feature_shape) + 1 or list(x.shape[1:]) != self.feature_shape:
            raise ValueError(
                "this exported amortizer takes contexts of shape (B, {}), got {}".format(
                    ", ".join([str(s) for s in self.feature_shape]), list(x.shape)
                )
            )
        if self.batch >= 0 and x.shape[0] != self.batch:
            raise ValueError(
                f"this amortizer was exported with a fixed batch size {self.batch} (its prediction draws seeded noise "
                f"that depends on the batch size), got a batch of {x.shape[0]}"
            )
        if x.dtype != self.dtype:
            got = self.dtype_names.get(int(x.dtype), "another dtype")
            raise ValueError(
                "this exported amortizer takes " + self.dtype_name + " contexts, got " + got
                + "; convert them first (e.g. x.to(torch." + self.dtype_name + "))"
            )
        return self.graph(x)


def _metadata(module: AmortizedModule, example: Tensor, dynamic_batch: bool, fmt: str) -> dict[str, Any]:
    return {
        "format": fmt,
        "model": type(module).__name__,
        "amortizer": type(module.amortizer).__name__,
        "objective": type(module.objective).__name__,
        "context_shape": ["B", *example.shape[1:]],
        "solution_dim": int(module.objective.dim),
        # the layout of a structured solution in the flat output (None: a plain vector)
        "solution_structure": None if module.objective.structure is None else module.objective.structure.describe(),
        "dtype": str(example.dtype).removeprefix("torch."),
        "batch": None if dynamic_batch else int(example.shape[0]),
    }


def export_torchscript(
    module: AmortizedModule, path: Union[str, Path], example: Tensor, dynamic_batch: bool = True
) -> Path:
    """Write the eval-mode prediction ``B x ... -> B x n`` as a TorchScript file (``torch.jit.load`` reads it).

    Args:
        module: the trained model.
        path: the file to write (conventionally ``.pt``).
        example: example contexts ``B x ...``.
        dynamic_batch: whether the file accepts any batch size (else exactly ``example``'s B).

    Returns:
        The path written.
    """
    graph = trace_inference(module, example, dynamic_batch)
    batch = -1 if dynamic_batch else int(example.shape[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*instance-level annotations.*")
        scripted = torch.jit.script(_CheckedInput(graph, list(example.shape[1:]), batch, example.dtype))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(_metadata(module, example, dynamic_batch, "torchscript"))
    torch.jit.save(scripted, str(path), _extra_files={f"{METADATA_KEY}.json": meta})
    return path


@contextlib.contextmanager
def _quiet_onnx_exporter() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(_Discard()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if not _importable(name)]
    if missing:
        raise ExportError(
            f"ONNX export needs {', '.join(missing)}: install them with `pip install -c constraints.txt "
            "\"lightning-amor[export]\"` (or `.[export]` in a checkout)"
        )


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def export_onnx(module: AmortizedModule, path: Union[str, Path], example: Tensor, dynamic_batch: bool = True) -> Path:
    """Write the eval-mode prediction ``B x ... -> B x n`` as an ONNX file (input ``x``, output ``y``).

    Args:
        module: the trained model.
        path: the file to write (conventionally ``.onnx``).
        example: example contexts ``B x ...``.
        dynamic_batch: whether axis 0 of ``x`` and ``y`` is dynamic (else exactly ``example``'s B).

    Returns:
        The path written.
    """
    _require_onnx()
    import onnx

    example = trace_example(example, dynamic_batch)
    graph = trace_inference(module, example, dynamic_batch).eval()
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet_onnx_exporter():
            torch.onnx.export(
                graph, (example,), str(path), dynamo=True, dynamic_shapes=shapes, input_names=["x"],
                output_names=["y"], verbose=False,
            )
    except Exception as err:  # noqa: BLE001 - the exporter's own failures, named with the model
        raise ExportError(
            f"torch.onnx.export failed on the traced prediction of {type(module).__name__}: {type(err).__name__}: {err}"
        ) from err
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(_metadata(module, example, dynamic_batch, "onnx"))
    onnx.save(model, str(path))
    return path


def export(
    module: AmortizedModule, path: Union[str, Path], example: Tensor, fmt: str, dynamic_batch: bool = True
) -> Path:
    """:func:`export_torchscript` or :func:`export_onnx`, by ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "torchscript":
        return export_torchscript(module, path, example, dynamic_batch)
    if fmt == "onnx":
        return export_onnx(module, path, example, dynamic_batch)
    raise ValueError(f"unknown export format {fmt!r}; choose one of {FORMATS}")


class ExportedAmortizer:
    """An exported file, loaded for inference: ``predict(x)`` maps contexts ``B x ...`` to ``B x n`` (CPU).

    Args:
        path: a TorchScript (``.pt``) or ONNX (``.onnx``) file written by this module.
        threads: intra-op threads of the ONNX Runtime session (default: ``torch.get_num_threads()``).
    """

    def __init__(self, path: Union[str, Path], threads: Optional[int] = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no exported amortizer at {self.path}")
        if self.path.suffix == ".onnx":
            _require_onnx()
            import onnx
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads or torch.get_num_threads()
            options.inter_op_num_threads = 1
            self.format = "onnx"
            self.session = onnxruntime.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
            self.input_name = self.session.get_inputs()[0].name
            props = {p.key: p.value for p in onnx.load(str(self.path), load_external_data=False).metadata_props}
            self.metadata = json.loads(props.get(METADATA_KEY, "{}"))
        else:
            files = {f"{METADATA_KEY}.json": ""}
            self.format = "torchscript"
            self.scripted = torch.jit.load(str(self.path), map_location="cpu", _extra_files=files)
            self.metadata = json.loads(files[f"{METADATA_KEY}.json"] or "{}")

    @property
    def batch(self) -> Optional[int]:
        """The fixed batch size of a static export, ``None`` for a dynamic batch."""
        return self.metadata.get("batch")

    @property
    def structure(self) -> Optional[Structure]:
        """The layout of a structured solution in the flat ``B x n`` output (``None``: a plain vector)."""
        described = self.metadata.get("solution_structure")
        if not described:
            return None
        if "shape" in described:
            return Structure(described["shape"])
        return Structure(dict(zip(described["names"], described["shapes"], strict=True)))

    def predict_solution(self, x: Tensor) -> Union[Tensor, dict[str, Tensor]]:
        """Predictions for contexts ``B x ...`` in the objective's structure (``B x *shape``, or a dict of named
        ``B x *shape`` tensors; ``B x n`` for a plain vector)."""
        y = self.predict(x)
        structure = self.structure
        return y if structure is None else structure.view(y)

    def predict(self, x: Tensor) -> Tensor:
        """Predictions ``B x n`` (flat) for contexts ``B x ...``."""
        if self.format == "onnx":
            return torch.from_numpy(self.session.run(None, {self.input_name: x.detach().cpu().numpy()})[0])
        with torch.no_grad():
            try:
                return self.scripted(x)
            except torch.jit.Error as err:  # the input checks' message, without TorchScript's traceback
                last = str(err).strip().splitlines()[-1]
                raise ValueError(f"{self.path}: {last.removeprefix('builtins.ValueError: ')}") from None


def check_export(
    path: Union[str, Path],
    module: AmortizedModule,
    contexts: Tensor,
    atol: float = 1e-5,
    batch_sizes: Optional[Sequence[int]] = None,
) -> float:
    """Run the exported file and the eager model on the same contexts and compare their predictions.

    Args:
        path: an exported file (``.pt`` or ``.onnx``).
        module: the eager model it was exported from.
        contexts: held-out contexts ``N x ...``.
        atol: the largest absolute difference allowed.
        batch_sizes: run the first ``b`` contexts for each ``b`` (default: ``1`` and ``N``); a static export is
            run on consecutive chunks of its own batch size instead.

    Returns:
        The largest absolute difference seen, over every batch.

    Raises:
        ExportMismatchError: some prediction differs by more than ``atol``.
        ExportError: dict contexts, or too few contexts for the batch sizes.
    """
    contexts = _check_example(contexts)
    exported = ExportedAmortizer(path)
    total = contexts.shape[0]
    if exported.batch is not None:
        if total < exported.batch:
            raise ExportError(
                f"{path} has the fixed batch size {exported.batch}; pass at least that many contexts, got {total}"
            )
        batches = [contexts[i : i + exported.batch] for i in range(0, total - exported.batch + 1, exported.batch)]
    else:
        sizes = sorted(set(batch_sizes or (1, total)))
        if sizes[0] < 1 or sizes[-1] > total:
            raise ExportError(f"batch sizes must lie in [1, {total}] (the number of contexts), got {sizes}")
        batches = [contexts[:b] for b in sizes]
    worst = 0.0
    with evaluation_mode(module), torch.no_grad():
        for x in batches:
            expected = module(x.to(module.device)).cpu()
            got = exported.predict(x)
            if got.shape != expected.shape:
                raise ExportMismatchError(
                    f"{path} returned shape {tuple(got.shape)} for a batch of {x.shape[0]}, the eager model "
                    f"{tuple(expected.shape)}"
                )
            diff = (got.to(expected.dtype) - expected).abs()
            error = float(diff.max()) if diff.numel() else 0.0
            if not error <= atol:  # NaN differences fail too
                row = int(diff.amax(dim=1).argmax())
                raise ExportMismatchError(
                    f"{path} ({exported.format}) differs from the eager {type(module).__name__} by {error:.3g} > "
                    f"atol={atol:g} on a batch of {x.shape[0]} held-out contexts (worst: context {row}); the eager "
                    "model changed after the export (re-export it), or the exporter lost precision"
                )
            worst = max(worst, error)
    return worst
