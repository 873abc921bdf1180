"""Deployment: lower an allocation to CPU int8/int4 kernels, check it, save it, benchmark it."""

from lampq_fx.deploy.kernels import Int4WeightOnlyLinear, Int8Linear
from lampq_fx.deploy.lowered import (
    LoweredFileError,
    LoweredModel,
    compare_with_simulation,
    load_lowered,
    lower_session,
    save_lowered,
)
from lampq_fx.deploy.lowering import LayerPlan, LoweringBackend, TorchAOFXBackend, plan_lowering

__all__ = ["Int4WeightOnlyLinear", "Int8Linear", "LayerPlan", "LoweredFileError", "LoweredModel", "LoweringBackend",
           "TorchAOFXBackend", "compare_with_simulation", "load_lowered", "lower_session", "plan_lowering",
           "save_lowered"]
