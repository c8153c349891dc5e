"""lightning-amor: amortized optimization with PyTorch Lightning."""

# First: fails clearly if another project's `datamodules` package hides ours (lightning_amor/datamodules_guard.py)
import lightning_amor.datamodules_guard  # noqa: F401

# isort: split
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
from lightning_amor.fixed_point import (
    Anderson,
    FixedPointIteration,
    FixedPointObjective,
    FixedPointResult,
    implicit_fixed_point,
)
from lightning_amor.importance import ImportanceEstimate, importance_log_likelihood
from lightning_amor.inference import Calibration, Fallback, InferenceResult
from lightning_amor.losses import AmortizationLoss, IterateSumLoss, ObjectiveLoss, RegressionLoss
from lightning_amor.metrics import AmortizationMetrics
from lightning_amor.module import AmortizedModule, BadCheckpointError, NonFiniteLossError
from lightning_amor.multi_hypothesis import MultiHypothesis, MultiHypothesisLoss
from lightning_amor.nets import MLP, LearnedConstant
from lightning_amor.objective import Context, Objective, ObjectiveShapeError
from lightning_amor.proximal import L1, Box, CompositeObjective, NonNegative, Simplex, Zero
from lightning_amor.proximal_solvers import FISTA, ISTA
from lightning_amor.residual_figures import ResidualCurves
from lightning_amor.tolerance_solve import InnerSolveReport, ToleranceSemiAmortized, solve_to_tolerance
from lightning_amor.updates import AdamStep, GradientStep, InnerUpdate, LearnedUpdate, ProximalStep

__version__ = "0.1.0"

__all__ = [
    "AdamStep",
    "AmortizationFigures",
    "AmortizationLoss",
    "AmortizationMetrics",
    "AmortizedModule",
    "AmortizedOutput",
    "Amortizer",
    "Anderson",
    "BadCheckpointError",
    "Box",
    "Calibration",
    "CompositeObjective",
    "Context",
    "ExportError",
    "ExportMismatchError",
    "ExportedAmortizer",
    "FISTA",
    "Fallback",
    "FixedPointIteration",
    "FixedPointObjective",
    "FixedPointResult",
    "FullyAmortized",
    "GradientStep",
    "ISTA",
    "ImportanceEstimate",
    "InferenceResult",
    "InnerSolveReport",
    "InnerUpdate",
    "IterateSumLoss",
    "L1",
    "LearnedConstant",
    "LearnedUpdate",
    "MLP",
    "MultiHypothesis",
    "MultiHypothesisLoss",
    "NonFiniteLossError",
    "NonNegative",
    "Objective",
    "ObjectiveLoss",
    "ObjectiveShapeError",
    "ProximalStep",
    "RegressionLoss",
    "ResidualCurves",
    "SemiAmortized",
    "Simplex",
    "ToleranceSemiAmortized",
    "Zero",
    "check_export",
    "curve_figure",
    "export_onnx",
    "export_torchscript",
    "implicit_fixed_point",
    "importance_log_likelihood",
    "solve_to_tolerance",
]
