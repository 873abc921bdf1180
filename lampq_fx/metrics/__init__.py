"""Sensitivity metrics: empirical Fisher traces and the type-aware score Ω."""

from lampq_fx.metrics.fisher import FisherTrace, NonFiniteError, classification_loss, compute_fisher_traces
from lampq_fx.metrics.sensitivity import ErrorTable, SensitivityTable, TypeScaleFit, fit_type_scales

__all__ = [
    "ErrorTable",
    "FisherTrace",
    "NonFiniteError",
    "SensitivityTable",
    "TypeScaleFit",
    "classification_loss",
    "compute_fisher_traces",
    "fit_type_scales",
]
