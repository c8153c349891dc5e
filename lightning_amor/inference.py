"""Amortize-then-refine inference, by its parts (kept so that older imports keep working).

- :mod:`lightning_amor.certificates`: f, the certificate residual and the violation of solutions;
- :mod:`lightning_amor.calibration`: the validation residuals and contexts that set out-of-distribution thresholds;
- :mod:`lightning_amor.fallback`: the policy (accept, refine from the prediction, or fall back from scratch);
- :mod:`lightning_amor.runtime`: evaluation mode and device moves.
"""

from lightning_amor.calibration import (
    CALIBRATION_KEY,
    Calibration,
    calibrate,
    context_features,
    context_features_fit,
    prediction_residuals,
)
from lightning_amor.certificates import certify, nonfinite_rows, stationarity_residual
from lightning_amor.fallback import ORACLE_ITERATIONS, STATUSES, Fallback, InferenceResult
from lightning_amor.runtime import evaluation_mode

__all__ = [
    "CALIBRATION_KEY",
    "ORACLE_ITERATIONS",
    "STATUSES",
    "Calibration",
    "Fallback",
    "InferenceResult",
    "calibrate",
    "certify",
    "context_features",
    "context_features_fit",
    "evaluation_mode",
    "nonfinite_rows",
    "prediction_residuals",
    "stationarity_residual",
]
