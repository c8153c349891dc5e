"""lightning-amor: amortized optimization with PyTorch Lightning."""

from lightning_amor.amortizers import AmortizedOutput, Amortizer, FullyAmortized, SemiAmortized
from lightning_amor.export import (
    ExportedAmortizer,
    ExportError,
    ExportMismatchError,
    check_export,
    export_onnx,
    export_torchscript,
)
from lightning_amor.figures import AmortizationFigures, curve_figure
from lightning_amor.inference import Calibration, Fallback, InferenceResult
from lightning_amor.losses import AmortizationLoss, IterateSumLoss, ObjectiveLoss, RegressionLoss
from lightning_amor.metrics import AmortizationMetrics
from lightning_amor.module import AmortizedModule, BadCheckpointError, NonFiniteLossError
from lightning_amor.nets import MLP, LearnedConstant
from lightning_amor.objective import Context, Objective, ObjectiveShapeError
from lightning_amor.updates import AdamStep, GradientStep, InnerUpdate, LearnedUpdate

__version__ = "0.1.0"

__all__ = [
    "AdamStep",
    "AmortizationFigures",
    "AmortizationLoss",
    "AmortizationMetrics",
    "AmortizedModule",
    "AmortizedOutput",
    "Amortizer",
    "BadCheckpointError",
    "Context",
    "ExportError",
    "ExportMismatchError",
    "ExportedAmortizer",
    "Fallback",
    "FullyAmortized",
    "GradientStep",
    "InferenceResult",
    "InnerUpdate",
    "IterateSumLoss",
    "LearnedConstant",
    "LearnedUpdate",
    "MLP",
    "NonFiniteLossError",
    "Objective",
    "ObjectiveLoss",
    "ObjectiveShapeError",
    "RegressionLoss",
    "Calibration",
    "SemiAmortized",
    "check_export",
    "curve_figure",
    "export_onnx",
    "export_torchscript",
]
