"""Lowered models: build from a session and an allocation, compare with the simulation, save and load.

A saved lowered model is a directory with ``allocation.json`` (the allocation as the
allocator wrote it) and ``lowered.pt``, which contains the format version, a fingerprint
of the model's layers, the lowering plan and the state dict of the lowered module.
``load_lowered`` rebuilds the same module from the float model and loads that state,
so no calibration runs again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lampq_fx.allocation.space import Allocation
from lampq_fx.analysis.layer_types import LayerInfo, annotate_layers
from lampq_fx.analysis.tracing import trace_model
from lampq_fx.deploy.kernels import Int4WeightOnlyLinear, Int8Linear
from lampq_fx.deploy.lowering import (
    INT8_STATIC,
    LayerPlan,
    LoweringBackend,
    cast_float_parts,
    default_backend,
    op_table,
    plan_lowering,
    plan_table,
    plans_from_dicts,
    plans_to_dicts,
    simulated_bits,
)
from lampq_fx.io import write_bytes_atomic

logger = logging.getLogger(__name__)

FORMAT_NAME = "lampq-lowered"
FORMAT_VERSION = 2  # 2: static int8 Linear layers are Int8Linear modules


class LoweredFileError(ValueError):
    """A saved lowered model does not fit this model or this version of lampq_fx."""


def layer_description(layers: Sequence[LayerInfo]) -> list[list]:
    """List every quantizable layer's name, kind, type and weight count."""
    return [[layer.name, layer.kind.value, layer.layer_type.value, layer.weight_params] for layer in layers]


def model_fingerprint(layers: Sequence[LayerInfo]) -> str:
    """SHA-256 over ``layer_description``."""
    return hashlib.sha256(json.dumps(layer_description(layers)).encode()).hexdigest()[:16]


def _first_difference(saved: list[list], current: list[list]) -> str:
    if len(saved) != len(current):
        return f"{len(saved)} quantizable layers in the file, {len(current)} in this model"
    for old, new in zip(saved, current):
        if old != new:
            return f"layer {old[0]} ({old[2]}, {old[3]} weights) in the file is {new[0]} ({new[2]}, {new[3]} weights) here"
    return "the layers match but the fingerprint does not"


@dataclass
class LoweredModel:
    module: nn.Module
    plans: list[LayerPlan]
    mode: str
    backend: str
    fingerprint: str
    layers: list | None = None  # layer_description of the source model, saved for error messages
    float_dtype: torch.dtype = torch.float32  # dtype of the ops that stay float (LayerNorm, softmax, ...)
    int4_dtype: torch.dtype = torch.bfloat16  # dtype of the int4 layers' dense matmul

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)

    @property
    def simulated_bits(self) -> dict:
        return simulated_bits(self.plans)

    def op_table(self) -> list[dict]:
        return op_table(self.module, self.float_dtype)

    def plan_table(self) -> str:
        return plan_table(self.plans, self.float_dtype, self.int4_dtype)

    def weight_bytes(self) -> int:
        return lowered_weight_bytes(self.module)


def lowered_weight_bytes(module: nn.Module) -> int:
    """Bytes of weights as stored for inference: packed int4 and int8 tensors, float elsewhere."""
    total = 0
    counted = set()
    for name, sub in module.named_modules():
        if isinstance(sub, (Int4WeightOnlyLinear, Int8Linear)):  # an Int8PatchConv counts through its Int8Linear
            total += sub.weight_bytes() + (sub.bias.numel() * 4 if sub.bias is not None else 0)
            counted.add(name)
        elif hasattr(sub, "_weight_bias") and callable(sub._weight_bias) and name.rpartition(".")[0] not in counted:
            # A quantized Linear and its _packed_params child both expose _weight_bias: count it once.
            weight, bias = sub._weight_bias()
            total += weight.numel() * weight.element_size() + weight.q_per_channel_scales().numel() * 8 \
                if weight.qscheme() in (torch.per_channel_symmetric, torch.per_channel_affine) \
                else weight.numel() * weight.element_size()
            total += bias.numel() * 4 if bias is not None else 0
            counted.add(name)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        owner = name.rpartition(".")[0]
        if owner not in counted and tensor.dtype.is_floating_point:
            total += tensor.numel() * tensor.element_size()
    return total


@torch.no_grad()
def lower_session(session, allocation: Allocation | dict, *, mode: str = "static", calibration_images: int = 128,
                  backend: LoweringBackend | None = None, label: str | None = None,
                  float_dtype: torch.dtype = torch.float32, int4_dtype: torch.dtype = torch.bfloat16) -> LoweredModel:
    """Lower ``allocation`` of ``session``'s model to CPU kernels, calibrating on its images.

    ``float_dtype=torch.bfloat16`` runs the ops without an integer kernel (attention
    matmuls, softmax, LayerNorm, GELU, residual adds) in BF16, as BF16 eager does: faster
    on CPUs with BF16 instructions, further from the FP32 simulation. ``int4_dtype``
    is the dtype of the int4 layers' matmul: BF16 (default, fast) or FP32, which
    computes exactly the simulated product at FP32 speed (the int4 weights stay packed).
    """
    for name, value in (("float_dtype", float_dtype), ("int4_dtype", int4_dtype)):
        if value not in (torch.float32, torch.bfloat16):
            raise ValueError(f"{name} must be torch.float32 or torch.bfloat16, got {value}")
    bits = allocation.bits() if isinstance(allocation, Allocation) else dict(allocation)
    if label is None:
        label = f"{allocation.strategy} {allocation.budget.label}" if isinstance(allocation, Allocation) and \
            allocation.budget else "allocation"
    plans = plan_lowering(session.layers, bits, mode, label)
    backend = backend or default_backend()
    images = session.calibration.images[:calibration_images]
    batches = [images[i:i + session.batch_size] for i in range(0, len(images), session.batch_size)]
    static = [p.name for p in plans if p.kernel == INT8_STATIC]
    if static:
        session._require_calibration()  # static int8 layers take the simulation's input ranges
    params = {name: session.modules[name].input_quantizers[0].quant_params(8) for name in static}
    module = cast_float_parts(backend.lower(session.traced, plans, batches, session.calibration.images[:1], params),
                              float_dtype)
    set_int4_dtype(module, int4_dtype)
    logger.info("lowered %d layers with %s (%s): %s", len(plans), backend.name, mode,
                ", ".join(f"{kernel} {count}" for kernel, count in _kernel_counts(plans).items()))
    return LoweredModel(module, plans, mode, backend.name, model_fingerprint(session.layers),
                        layer_description(session.layers), float_dtype, int4_dtype)


def set_int4_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    for sub in module.modules():
        if isinstance(sub, Int4WeightOnlyLinear):
            sub.dense_dtype = dtype


def _kernel_counts(plans: Sequence[LayerPlan]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for plan in plans:
        counts[plan.kernel] = counts.get(plan.kernel, 0) + 1
    return counts


@torch.no_grad()
def compare_with_simulation(session, lowered: LoweredModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Logit differences and top-1 agreement between the lowered model and its simulation."""
    session.apply(lowered.simulated_bits)
    max_diff, abs_sum, elements, agree, count, correct_sim, correct_low = 0.0, 0.0, 0, 0, 0, 0, 0
    try:
        for images, labels in batches:
            simulated = session.graph_module(images)
            real = lowered.module(images).float()
            difference = (real - simulated).abs()
            max_diff = max(max_diff, float(difference.max()))
            abs_sum += float(difference.sum())
            elements += difference.numel()
            agree += int((real.argmax(-1) == simulated.argmax(-1)).sum())
            correct_sim += int((simulated.argmax(-1) == labels).sum())
            correct_low += int((real.argmax(-1) == labels).sum())
            count += len(images)
    finally:
        session.apply(None)
    return {"images": count, "max_abs_diff": max_diff, "mean_abs_diff": abs_sum / max(elements, 1),
            "top1_agreement": agree / max(count, 1), "simulated_top1": correct_sim / max(count, 1),
            "lowered_top1": correct_low / max(count, 1)}


def save_lowered(directory: Path | str, lowered: LoweredModel, allocation_json: dict | None = None) -> Path:
    """Write ``lowered.pt`` (and ``allocation.json`` when given) under ``directory``."""
    directory = Path(directory)
    payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "fingerprint": lowered.fingerprint,
               "mode": lowered.mode, "backend": lowered.backend, "plans": plans_to_dicts(lowered.plans),
               "layers": lowered.layers, "float_dtype": str(lowered.float_dtype).removeprefix("torch."),
               "int4_dtype": str(lowered.int4_dtype).removeprefix("torch."),
               "state_dict": lowered.module.state_dict()}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(directory / "lowered.pt", buffer.getvalue())
    if allocation_json is not None:
        write_bytes_atomic(directory / "allocation.json", (json.dumps(allocation_json, indent=2) + "\n").encode())
    return directory / "lowered.pt"


def load_lowered(model: nn.Module, path: Path | str, example: torch.Tensor,
                 backend: LoweringBackend | None = None) -> LoweredModel:
    """Rebuild a lowered model from its float model and a saved ``lowered.pt`` (or its directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "lowered.pt"
    if not path.is_file():
        raise FileNotFoundError(f"lowered model file {path} not found")
    try:
        # Quantized tensors and packed parameters are not plain tensors, so the full unpickler is
        # needed: load only files from a source you trust.
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # unpickling raises many types; all mean "not our file"
        raise LoweredFileError(f"cannot read {path} ({type(error).__name__}: {error})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise LoweredFileError(f"{path} is not a lampq_fx lowered model")
    if payload.get("version", 0) > FORMAT_VERSION:
        raise LoweredFileError(f"{path} has format version {payload['version']}, newer than this lampq_fx "
                               f"reads ({FORMAT_VERSION}); upgrade lampq_fx")
    if payload.get("version", 0) < FORMAT_VERSION:
        raise LoweredFileError(f"{path} has format version {payload['version']}, written by an older lampq_fx "
                               f"whose int8 layers this version does not rebuild; lower the allocation again")
    traced = trace_model(model, example)
    layers = annotate_layers(traced, example)
    fingerprint = model_fingerprint(layers)
    if payload["fingerprint"] != fingerprint:
        detail = _first_difference(payload["layers"], layer_description(layers)) if payload.get("layers") else \
            f"layer fingerprint {payload['fingerprint']}, this model has {fingerprint}"
        raise LoweredFileError(f"{path} was saved from a different model: {detail}")
    backend = backend or default_backend()
    if payload["backend"] != backend.name:
        raise LoweredFileError(f"{path} was lowered with {payload['backend']}, not {backend.name}")
    plans = plans_from_dicts(payload["plans"])
    float_dtype = getattr(torch, payload.get("float_dtype", "float32"))
    module = cast_float_parts(backend.rebuild(traced, plans, example), float_dtype)
    module.load_state_dict(payload["state_dict"], strict=True)
    int4_dtype = getattr(torch, payload.get("int4_dtype", "bfloat16"))
    set_int4_dtype(module, int4_dtype)
    return LoweredModel(module, plans, payload["mode"], payload["backend"], fingerprint, layer_description(layers),
                        float_dtype, int4_dtype)
