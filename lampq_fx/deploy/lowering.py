"""Lower a bit allocation to CPU integer kernels.

Kernel map, per layer of the allocation:

* 8-bit weights (and any width from 5 to 7, promoted to 8): ``torch.ao`` FX static
  int8 on the x86 backend (``QConfigMapping.set_module_name`` per layer, prepare_fx,
  calibration, convert_fx). After conversion, each int8 Linear becomes an
  ``Int8Linear`` and a patch-embedding convolution an ``Int8PatchConv``: oneDNN's
  int8 GEMM (``onednn.qlinear_pointwise``) with the simulated quantizer's input range
  (per channel after a LayerNorm, folded into the weight as RepQ-ViT does) and an FP32
  output, so nothing is requantized that the simulation keeps in float. The weights
  keep the simulated per-channel codes. Other convolutions keep the torch.ao module.
  ``mode="dynamic"`` uses dynamic int8 linear layers instead (activation scales
  computed per batch; convolutions then stay float).
* 4-bit weights (2 and 3 promoted to 4): ``Int4WeightOnlyLinear``, packed for
  ``aten._weight_int4pack_mm_for_cpu``, with BF16 activations; from 16 rows up it
  unpacks the codes and runs one dense BF16 matmul, which is faster on CPUs without
  AMX. Convolutions and layers whose input width is not a multiple of 32 have no int4
  kernel and go to int8.
* Activation-by-activation matmuls (q·kᵀ, attn·v), LayerNorm, GELU and softmax stay
  float32: the x86 backend has no integer kernel for them. The q·kᵀ, scale, mask,
  softmax and attn·v of a timm-style attention then run as one
  ``F.scaled_dot_product_attention`` call (``deploy/attention.py``), as eager timm does.

Every change of bit-width is a ``LayerPlan`` with a reason, logged as one warning and
listed in the report. ``simulated_bits`` gives the allocation after promotion, which
is what the lowered model must agree with.

The lowering sits behind ``LoweringBackend``: ``TorchAOFXBackend`` is the only
implementation today, and a torchao pt2e backend can replace it without touching
the planning, checks, serialization or benchmarks.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
import torch.fx as fx
from torch import nn

from lampq_fx.analysis.layer_types import LayerInfo, LayerKind
from lampq_fx.deploy.attention import fuse_float_attention
from lampq_fx.deploy.kernels import (
    GROUP_SIZES,
    INT4_OUT_MULTIPLE,
    Int4WeightOnlyLinear,
    Int8Linear,
    Int8PatchConv,
    int4_kernel_available,
    onednn_int8_available,
    pick_group_size,
)
from lampq_fx.quantize.quantizers import quantize_weight_per_channel

logger = logging.getLogger(__name__)

KERNEL_WEIGHT_BITS = (4, 8)
INT8_STATIC, INT8_DYNAMIC, INT4_WEIGHT_ONLY, FLOAT = "int8-static", "int8-dynamic", "int4-weight-only", "float32"
Bits = tuple[int | None, int | None]
ActivationParams = tuple[torch.Tensor, torch.Tensor]  # (scale, zero point), per tensor [1] or per channel [C]


@dataclass
class LayerPlan:
    """The kernel of one layer after lowering, and the bits that kernel realises."""

    name: str
    layer_type: str
    kind: str
    requested: Bits
    kernel: str
    bits: Bits  # the simulated bits that the kernel realises
    reason: str = ""

    @property
    def promoted(self) -> bool:
        return self.requested != self.bits

    @property
    def widened(self) -> bool:
        """Weight bits changed, or int8 activations widened: a change the allocator did not choose."""
        weight_changed = self.requested[0] != self.bits[0]
        act_widened = self.bits[1] is not None and self.requested[1] != self.bits[1]
        return weight_changed or act_widened


def plan_lowering(layers: Sequence[LayerInfo], bits: Mapping[str, Bits], mode: str = "static",
                  label: str = "allocation") -> list[LayerPlan]:
    """Map every layer's requested bits to a kernel and the bits that kernel realises.

    Activation-by-activation matmuls and int4 weight-only layers keep float activations
    by design. So the warning counts only layers whose weight width changed or whose
    int8 activations were widened. ``label`` names the allocation in the warning.
    """
    if mode not in ("static", "dynamic"):
        raise ValueError(f"mode must be 'static' or 'dynamic', got {mode!r}")
    int8 = INT8_STATIC if mode == "static" else INT8_DYNAMIC
    plans = []
    for layer in layers:
        requested = tuple(bits.get(layer.name, (None, None)))
        weight_bits, act_bits = requested
        common = dict(name=layer.name, layer_type=layer.layer_type.value, kind=layer.kind.value, requested=requested)
        if layer.kind is LayerKind.MATMUL:
            reason = "" if act_bits is None else "no integer kernel for activation-by-activation matmul"
            plans.append(LayerPlan(**common, kernel=FLOAT, bits=(None, None), reason=reason))
            continue
        if weight_bits is None:
            plans.append(LayerPlan(**common, kernel=FLOAT, bits=(None, None)))
            continue
        reasons = []
        wants_int4 = weight_bits <= 4
        if wants_int4 and layer.kind is LayerKind.CONV2D:
            reasons.append("no int4 convolution kernel")
            wants_int4 = False
        elif wants_int4 and ((layer.weight_params // layer.out_channels) % GROUP_SIZES[0]
                             or layer.out_channels % INT4_OUT_MULTIPLE):
            reasons.append(f"int4 kernel needs input width a multiple of {GROUP_SIZES[0]} and output "
                           f"width a multiple of {INT4_OUT_MULTIPLE}")
            wants_int4 = False
        elif wants_int4 and not int4_kernel_available():
            reasons.append(f"torch {torch.__version__} has no int4 CPU kernel")
            wants_int4 = False
        if wants_int4:
            if weight_bits != 4:
                reasons.append(f"no {weight_bits}-bit kernel, weights promoted to 4 bits")
            if act_bits is not None:
                reasons.append("weight-only kernel, activations run in BF16")
            plans.append(LayerPlan(**common, kernel=INT4_WEIGHT_ONLY, bits=(4, None), reason="; ".join(reasons)))
            continue
        if weight_bits not in (4, 8) or (weight_bits == 4 and reasons):
            reasons.append(f"weights promoted from {weight_bits} to 8 bits")
        if layer.kind is LayerKind.CONV2D and mode == "dynamic":
            plans.append(LayerPlan(**common, kernel=FLOAT, bits=(None, None),
                                   reason="no dynamic int8 convolution kernel, runs in float32"))
            continue
        if act_bits is not None and act_bits != 8:
            reasons.append(f"activations promoted from {act_bits} to 8 bits")
        plans.append(LayerPlan(**common, kernel=int8, bits=(8, 8), reason="; ".join(reasons)))
    promoted = [p for p in plans if p.widened]
    if promoted:
        examples = ", ".join(f"{p.name} {_label(p.requested)}→{_label(p.bits, p.kernel)}" for p in promoted[:4])
        logger.warning("%s: %d of %d layers change bit-width to fit a CPU kernel (%s%s); LayerPlan.reason "
                       "(lowered.plans, or the bench report) gives each reason", label, len(promoted), len(plans),
                       examples, ", …" if len(promoted) > 4 else "")
    return plans


def _label(bits: Bits, kernel: str = "") -> str:
    weight, act = bits
    if kernel == INT4_WEIGHT_ONLY:
        return f"w{weight}abf16"
    text = f"w{weight}" if weight is not None else ""
    if act is None:
        return text + "a32"
    return text + f"a{act}"


def simulated_bits(plans: Sequence[LayerPlan]) -> dict[str, Bits]:
    """Return the allocation after promotion, for ``LampQSession.apply`` / ``evaluate``."""
    return {p.name: p.bits for p in plans}


class LoweringBackend(Protocol):
    """Turns a float FX graph and a plan into a model that runs on integer kernels."""

    name: str

    def lower(self, float_model: fx.GraphModule, plans: Sequence[LayerPlan],
              calibration: Iterable[torch.Tensor], example: torch.Tensor,
              activation_params: Mapping[str, ActivationParams] | None = None) -> nn.Module:
        """``activation_params``: the simulated 8-bit input (scale, zero point) of each int8 layer."""
        ...

    def rebuild(self, float_model: fx.GraphModule, plans: Sequence[LayerPlan], example: torch.Tensor) -> nn.Module:
        """Build the same module structure without calibration, ready for ``load_state_dict``."""
        ...


def _int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """Return the simulated quantizer's per-channel symmetric 8-bit weight as a qint8 tensor."""
    dequantized, scale = quantize_weight_per_channel(weight, 8)
    return torch.quantize_per_channel(dequantized.float(), scale.double(), torch.zeros_like(scale, dtype=torch.long),
                                      0, torch.qint8)


def _int4_module(linear: nn.Linear) -> Int4WeightOnlyLinear:
    dequantized, scale = quantize_weight_per_channel(linear.weight, 4)
    codes = torch.round(dequantized.float() / scale[:, None]).to(torch.int32)
    return Int4WeightOnlyLinear.from_codes(codes, scale.float(), linear.bias,
                                           pick_group_size(linear.in_features))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


class TorchAOFXBackend:
    """``torch.ao.quantization`` FX mode (prepare_fx / convert_fx) on the x86 backend."""

    def __init__(self, reduce_range: bool = False, fp32_output: bool = True, fuse_attention: bool = True) -> None:
        # reduce_range=True (torch's x86 default) keeps 7-bit activations, which avoids
        # overflow in the AVX2 u8·s8 instruction; VNNI and AMX machines do not need it.
        self.reduce_range = reduce_range
        # fp32_output: static int8 Linear layers run as Int8Linear (simulated input ranges, FP32 output)
        self.fp32_output = fp32_output
        # fuse_attention: the float q·kᵀ, softmax and attn·v run as one scaled_dot_product_attention
        self.fuse_attention = fuse_attention
        self.name = "torch.ao-fx-x86" + ("+onednn-fp32-out" if fp32_output else "")

    def _qconfig_mapping(self, plans: Sequence[LayerPlan]):
        from torch.ao.quantization import QConfig, QConfigMapping, default_dynamic_qconfig
        from torch.ao.quantization.observer import HistogramObserver, PerChannelMinMaxObserver
        static = QConfig(activation=HistogramObserver.with_args(reduce_range=self.reduce_range),
                         weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8,
                                                                   qscheme=torch.per_channel_symmetric))
        mapping = QConfigMapping().set_global(None)
        for plan in plans:
            if plan.kernel == INT8_STATIC:
                mapping.set_module_name(plan.name, static)
            elif plan.kernel == INT8_DYNAMIC:
                mapping.set_module_name(plan.name, default_dynamic_qconfig)
        return mapping

    def _prepare(self, float_model: fx.GraphModule, plans: Sequence[LayerPlan], example: torch.Tensor):
        from torch.ao.quantization.backend_config import get_native_backend_config
        from torch.ao.quantization.quantize_fx import prepare_fx
        torch.backends.quantized.engine = "x86"
        model = copy.deepcopy(float_model).eval()
        return prepare_fx(model, self._qconfig_mapping(plans), example_inputs=(example,),
                          backend_config=get_native_backend_config())

    def _convert(self, prepared: fx.GraphModule, float_model: fx.GraphModule, plans: Sequence[LayerPlan],
                 activation_params: Mapping[str, ActivationParams] | None = None):
        from torch.ao.quantization.quantize_fx import convert_fx
        converted = convert_fx(prepared)
        activation_params = activation_params or {}
        for plan in plans:
            if plan.kernel in (INT8_STATIC, INT8_DYNAMIC):
                module = converted.get_submodule(plan.name)
                source = float_model.get_submodule(plan.name)
                module.set_weight_bias(_int8_weight(source.weight), module.bias())
                if plan.kernel == INT8_STATIC:
                    _use_simulated_input(converted, plan.name, activation_params.get(plan.name), self.fp32_output)
            elif plan.kernel == INT4_WEIGHT_ONLY:
                _set_submodule(converted, plan.name, _int4_module(float_model.get_submodule(plan.name)))
        converted.graph.lint()
        converted.recompile()
        if self.fuse_attention:
            fuse_float_attention(converted)
        return converted

    @torch.no_grad()
    def lower(self, float_model: fx.GraphModule, plans: Sequence[LayerPlan],
              calibration: Iterable[torch.Tensor], example: torch.Tensor,
              activation_params: Mapping[str, ActivationParams] | None = None) -> nn.Module:
        prepared = self._prepare(float_model, plans, example)
        seen = 0
        for images in calibration:
            prepared(images)
            seen += len(images)
        if seen == 0 and any(p.kernel == INT8_STATIC for p in plans):
            raise ValueError("static int8 lowering needs calibration images; none were given")
        return self._convert(prepared, float_model, plans, activation_params)

    @torch.no_grad()
    def rebuild(self, float_model: fx.GraphModule, plans: Sequence[LayerPlan], example: torch.Tensor) -> nn.Module:
        prepared = self._prepare(float_model, plans, example)
        prepared(example)  # placeholder ranges; load_state_dict replaces every quantization parameter
        return self._convert(prepared, float_model, plans)


def _find_module_node(graph: fx.Graph, name: str) -> fx.Node:
    for node in graph.nodes:
        if node.op == "call_module" and node.target == name:
            return node
    raise KeyError(f"no call of module {name} in the converted graph")


def _is_quantize(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.quantize_per_tensor


def _use_simulated_input(converted: fx.GraphModule, name: str, params: ActivationParams | None,
                         fp32_output: bool) -> None:
    """Give an int8 layer the simulated input quantizer and an FP32 output.

    torch.ao picks input ranges with its own observer and requantizes every output to
    int8; both differ from the simulation the allocator scored. A Linear becomes an
    ``Int8Linear`` and a patch-embedding convolution an ``Int8PatchConv``: the input is
    quantized with ``params`` (per channel where the simulation is), the output stays
    FP32 and the trailing dequantize goes. Other convolutions keep the torch.ao kernel
    with ``params`` as their per-tensor input range.
    """
    node = _find_module_node(converted.graph, name)
    module = converted.get_submodule(name)
    quantize = node.args[0] if _is_quantize(node.args[0]) else None
    if quantize is not None and params is None:  # rebuild, or no session: keep the observer's range
        params = (getattr(converted, quantize.args[1].target).reshape(1),
                  getattr(converted, quantize.args[2].target).reshape(1))
    kind = type(module).__name__
    rebuilt = fp32_output and onednn_int8_available() and params is not None and \
        (kind == "Linear" or (kind == "Conv2d" and Int8PatchConv.supports(module)))
    if not rebuilt:
        if quantize is not None and params is not None and params[0].numel() == 1:
            setattr(converted, quantize.args[1].target, params[0].reshape(()).float())
            setattr(converted, quantize.args[2].target, torch.round(params[1]).reshape(()).long())
        return
    weight, bias = module.weight().dequantize(), module.bias()
    replacement = (Int8Linear if kind == "Linear" else Int8PatchConv).from_weight(weight, bias, *params)
    graph = converted.graph
    if quantize is not None:
        float_input = quantize.args[0]
    else:  # the input is already a quantized tensor: dequantize it first
        with graph.inserting_before(node):
            float_input = graph.call_method("dequantize", (node.args[0],))
    output_scale, output_zero_point = float(module.scale), int(module.zero_point)
    _set_submodule(converted, name, replacement)
    node.args = (float_input,)
    for user in list(node.users):
        if user.op == "call_method" and user.target == "dequantize":
            user.replace_all_uses_with(node)
            graph.erase_node(user)
        else:  # a consumer that takes int8: requantize for it
            with graph.inserting_after(node):
                requantized = graph.call_function(torch.quantize_per_tensor,
                                                  (node, output_scale, output_zero_point, torch.quint8))
            user.replace_input_with(node, requantized)
    if quantize is not None and not quantize.users:
        graph.erase_node(quantize)


KERNEL_MODULES = (Int4WeightOnlyLinear, Int8Linear, Int8PatchConv)


def _float_to(value, dtype: torch.dtype):
    """Cast a floating-point tensor to ``dtype``; anything else passes through."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


def cast_float_parts(model: fx.GraphModule, dtype: torch.dtype) -> fx.GraphModule:
    """Run every float op of a lowered graph in ``dtype`` (BF16): what BF16 eager does, around the kernels.

    Float parameters and buffers of non-kernel modules are cast, the input is cast once
    at the start and the output back to FP32 at the end. Kernel modules keep their own
    dtypes (int4 layers take BF16 directly, int8 layers quantize from any float), and a
    torch.ao quantize node gets an FP32 input, its dequantize an output in ``dtype``.
    """
    if dtype == torch.float32:
        return model
    kernels = [name for name, module in model.named_modules() if isinstance(module, KERNEL_MODULES)]
    for name, module in model.named_modules():
        if isinstance(module, KERNEL_MODULES) or type(module).__module__.startswith("torch.ao.nn.quantized") or \
                any(name.startswith(prefix + ".") for prefix in kernels):
            continue
        for key, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor.dtype == torch.float32 and not key.endswith(("_scale_0", "_zero_point_0")):
                converted = tensor.detach().to(dtype)
                if isinstance(tensor, nn.Parameter):
                    setattr(module, key, nn.Parameter(converted, requires_grad=False))
                else:
                    setattr(module, key, converted)
    graph = model.graph
    for node in list(graph.nodes):
        if node.op == "placeholder":  # the images; other inputs (masks, flags) are often None
            with graph.inserting_after(node):
                cast = graph.call_function(_float_to, (node, dtype))
            node.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
        elif _is_quantize(node):
            with graph.inserting_before(node):
                node.update_arg(0, graph.call_method("float", (node.args[0],)))
        elif node.op == "call_method" and node.target == "dequantize":
            with graph.inserting_after(node):
                cast = graph.call_method("to", (node, dtype))
            node.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
        elif node.op == "output":
            with graph.inserting_before(node):
                node.update_arg(0, fx.node.map_arg(node.args[0], lambda value: graph.call_method("float", (value,))))
    graph.lint()
    model.recompile()
    return model


def default_backend() -> LoweringBackend:
    return TorchAOFXBackend()


def plan_table(plans: Sequence[LayerPlan], float_dtype: torch.dtype = torch.float32,
               int4_dtype: torch.dtype = torch.bfloat16) -> str:
    """Markdown: one row per layer whose bits changed, with the reason.

    ``float_dtype`` and ``int4_dtype`` are the lowered model's: float layers and int4
    activations are labelled with the dtype they run in.
    """
    float_name = "bf16" if float_dtype == torch.bfloat16 else "32"
    int4_name = "BF16" if int4_dtype == torch.bfloat16 else "FP32"
    rows = ["| layer | type | allocated | lowered | kernel | reason |", "|---|---|---|---|---|---|"]
    for p in plans:
        if not p.promoted:
            continue
        lowered, kernel, reason = _label(p.bits, p.kernel), p.kernel, p.reason
        if p.kernel == INT4_WEIGHT_ONLY:
            lowered = lowered.replace("abf16", f"a{int4_name.lower()}")
            reason = reason.replace("activations run in BF16", f"activations run in {int4_name}")
        elif p.kernel == FLOAT and float_name == "bf16":
            lowered, kernel = lowered.replace("a32", "abf16"), "bfloat16"
        rows.append(f"| {p.name} | {p.layer_type} | {_label(p.requested)} | {lowered} | {kernel} | {reason} |")
    return "\n".join(rows) if len(rows) > 2 else "No layer changed bit-width."


_INTEGER_MODULES = {
    "Linear": {"torch.ao.nn.quantized.modules.linear": "int8 static (x86)",
               "torch.ao.nn.quantized.dynamic.modules.linear": "int8 dynamic (x86)"},
    "Conv2d": {"torch.ao.nn.quantized.modules.conv": "int8 static (x86)"},
}


def _module_kernel(module: nn.Module) -> str:
    if isinstance(module, Int4WeightOnlyLinear):
        return "int4 weight-only, BF16 activations"
    if isinstance(module, Int8PatchConv):
        module = module.linear
    if isinstance(module, Int8Linear):
        granularity = "per-channel" if module.per_channel_input else "per-tensor"
        return f"int8 (x86 oneDNN), {granularity} input, FP32 output"
    kind = _INTEGER_MODULES.get(type(module).__name__, {}).get(type(module).__module__)
    if kind:
        return kind
    if type(module).__module__.startswith("torch.ao.nn.quantized"):
        return "quantized"
    return "float32"


def op_table(model: nn.Module, float_dtype: torch.dtype = torch.float32) -> list[dict]:
    """Count every op of a lowered FX model and name the kernel it runs on (``float_dtype``: float ops)."""
    float_name = str(float_dtype).removeprefix("torch.")
    if not isinstance(model, fx.GraphModule):
        raise TypeError("op_table needs the FX GraphModule that lowering returns")
    counts: Counter = Counter()
    for node in model.graph.nodes:
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if isinstance(module, (nn.Dropout, nn.Identity)):
                continue
            kernel = _module_kernel(module)
            counts[(type(module).__name__, float_name if kernel == "float32" else kernel)] += 1
        elif node.op in ("call_function", "call_method"):
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            if name in ("_assert", "getattr", "getitem", "size", "dim", "reshape", "view", "permute", "transpose",
                        "flatten", "contiguous", "expand", "unbind", "chunk", "split", "cat", "__getitem__"):
                continue  # shape and indexing ops move data, they compute nothing
            if name in ("quantize_per_tensor", "quantize_per_tensor_dynamic"):
                kernel = "float32 → int8"
            elif name == "dequantize":
                kernel = "int8 → float32"
            elif name in ("_float_to", "float", "to"):
                kernel = f"cast ({float_name} graph)"
            else:
                kernel = float_name
            counts[(name, kernel)] += 1
    return [{"op": op, "runs_on": kernel, "count": count}
            for (op, kernel), count in sorted(counts.items(), key=lambda item: (item[0][1], item[0][0]))]


def format_op_table(rows: Sequence[dict]) -> str:
    lines = ["| op | runs on | count |", "|---|---|---:|"]
    lines += [f"| {row['op']} | {row['runs_on']} | {row['count']} |" for row in rows]
    return "\n".join(lines)


def plans_to_dicts(plans: Sequence[LayerPlan]) -> list[dict]:
    return [asdict(p) for p in plans]


def plans_from_dicts(data: Sequence[dict]) -> list[LayerPlan]:
    return [LayerPlan(**{**d, "requested": tuple(d["requested"]), "bits": tuple(d["bits"])}) for d in data]
