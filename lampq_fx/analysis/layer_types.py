"""Find the quantizable layers of a traced ViT and type them from the graph structure.

Quantizable layers are ``nn.Linear`` and ``nn.Conv2d`` modules and matmuls whose two
operands are both activations (the attention products q·kᵀ and attn·v). Each one's
type follows from what feeds what, never from module names:

==============  ==============================================================
type            structural rule (tried in this order)
==============  ==============================================================
attn_v          matmul whose first operand comes from a softmax
attn_qk         matmul whose output reaches a softmax before any other layer
patch_embed     weighted layer with no quantizable layer upstream
qkv             linear whose output reaches an attention matmul operand
proj            linear whose input comes from an attn_v matmul
fc1             linear whose output passes an activation function (GELU, ...)
fc2             linear whose input comes, through an activation, from an fc1
head            weighted layer whose output reaches the graph output directly
other           anything else, e.g. the Swin patch-merging reduction
==============  ==============================================================

"Upstream" and "downstream" walk the graph through non-quantizable nodes and stop
at the next quantizable one, or at another learned convolution (a transposed conv in
a detection pyramid). A layer that the rules leave as ``other`` but whose module name
is a common role name gets that role, with a log line saying so. A module called at
several graph nodes (a detection head shared across pyramid levels) is one layer.
"""

from __future__ import annotations

import enum
import logging
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

logger = logging.getLogger(__name__)

META_KEY = "lampq"


class LayerType(str, enum.Enum):
    PATCH_EMBED = "patch_embed"
    QKV = "qkv"
    ATTN_QK = "attn_qk"
    ATTN_V = "attn_v"
    PROJ = "proj"
    FC1 = "fc1"
    FC2 = "fc2"
    HEAD = "head"
    OTHER = "other"


class LayerKind(str, enum.Enum):
    LINEAR = "linear"
    CONV2D = "conv2d"
    MATMUL = "matmul"


@dataclass
class LayerInfo:
    """One quantizable layer, stored in ``node.meta['lampq']`` of its graph node.

    ``fisher_weight``/``fisher_input``, ``omega`` and the bits start empty and are
    filled by the scoring and allocation steps, so the graph carries the whole story.
    """

    name: str
    node_name: str
    kind: LayerKind
    layer_type: LayerType
    weight_params: int
    out_channels: int
    macs: int
    post_norm_input: bool
    typed_by: str = "structure"
    fisher_weight: float | None = None
    fisher_input: list[float] | None = None
    omega: dict[str, float] = field(default_factory=dict)
    weight_bits: int | None = None
    act_bits: int | None = None
    calls: int = 1  # graph nodes that call this module (a head shared across pyramid levels has several)

    @property
    def has_weight(self) -> bool:
        return self.kind is not LayerKind.MATMUL

    @property
    def num_inputs(self) -> int:
        return 2 if self.kind is LayerKind.MATMUL else 1


_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
_SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax}
_ACTIVATION_FUNCTIONS = {
    F.gelu, F.relu, F.silu, F.mish, F.hardswish, F.elu, F.leaky_relu, F.relu6, F.glu,
    torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
}
_ACTIVATION_METHODS = {"relu", "sigmoid", "tanh", "relu_", "sigmoid_", "tanh_"}
_ACTIVATION_MODULES = (
    nn.GELU, nn.ReLU, nn.SiLU, nn.Mish, nn.Hardswish, nn.ELU, nn.LeakyReLU, nn.ReLU6,
    nn.Sigmoid, nn.Tanh, nn.GLU, nn.SELU, nn.CELU, nn.Softplus,
)
_ACTIVATION_MODULE_PACKAGES = ("timm.layers.activations",)
_NORM_MODULES = (nn.LayerNorm, nn.RMSNorm)
_NORM_FUNCTIONS = {F.layer_norm, torch.layer_norm, F.rms_norm}
# Nodes that move or select values without changing them: walking back through these
# from a linear's input shows whether it reads a LayerNorm output directly.
_SHAPE_METHODS = {"reshape", "view", "permute", "transpose", "flatten", "contiguous",
                  "unsqueeze", "squeeze", "expand", "to", "float"}
_SHAPE_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.permute,
                    torch.transpose, torch.roll, F.pad}
# Reads of tensor metadata: values derived only from these (shapes, sizes) carry no
# activation values, so the structural walks do not follow them.
_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim"}
_METADATA_METHODS = {"size", "dim"}
_PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout, nn.Flatten)
_ROLE_NAME_HINTS = {
    "qkv": LayerType.QKV, "in_proj": LayerType.QKV, "proj": LayerType.PROJ,
    "out_proj": LayerType.PROJ, "fc1": LayerType.FC1, "fc2": LayerType.FC2,
    "head": LayerType.HEAD, "patch_embed": LayerType.PATCH_EMBED,
}


def _module(graph_module: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return graph_module.get_submodule(node.target)


def _node_kind(graph_module: fx.GraphModule, node: fx.Node) -> LayerKind | None:
    module = _module(graph_module, node)
    if isinstance(module, nn.Linear):
        return LayerKind.LINEAR
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            logger.info("layer %s is a grouped Conv2d (groups=%d): left in float, not quantized",
                        node.target, module.groups)
            return None
        return LayerKind.CONV2D
    is_matmul = (node.op == "call_function" and node.target in _MATMUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MATMUL_METHODS)
    if is_matmul:
        operands = node.args[:2]
        if all(isinstance(arg, fx.Node) and arg.op != "get_attr" for arg in operands):
            return LayerKind.MATMUL
    return None


def _is_softmax(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _SOFTMAX_FUNCTIONS
    if node.op == "call_method":
        return node.target == "softmax"
    return isinstance(_module(graph_module, node), nn.Softmax)


def _is_activation(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ACTIVATION_METHODS
    module = _module(graph_module, node)
    if module is None:
        return False
    return isinstance(module, _ACTIVATION_MODULES) or type(module).__module__.startswith(
        _ACTIVATION_MODULE_PACKAGES)


def _is_norm(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _NORM_FUNCTIONS
    return isinstance(_module(graph_module, node), _NORM_MODULES)


def _is_pass_through(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function":
        return node.target in _SHAPE_FUNCTIONS
    return isinstance(_module(graph_module, node), _PASS_THROUGH_MODULES)


def _metadata_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Return the nodes whose values derive only from tensor shapes, sizes or dtypes."""
    metadata: set[fx.Node] = set()
    for node in graph.nodes:
        reads_metadata = (
            (node.op == "call_function" and node.target is getattr
             and len(node.args) > 1 and node.args[1] in _METADATA_ATTRIBUTES)
            or (node.op == "call_method" and node.target in _METADATA_METHODS)
        )
        derived = (node.op == "call_function" and node.all_input_nodes
                   and all(source in metadata for source in node.all_input_nodes))
        if reads_metadata or derived:
            metadata.add(node)
    return metadata


@dataclass
class _Walk:
    """The result of a walk from one node up to the nearest quantizable nodes."""

    layers: set[fx.Node]
    visited: list[fx.Node]
    reaches_output: bool = False


def _walk(start: Iterable[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]],
          quantizable: set[fx.Node]) -> _Walk:
    walk = _Walk(layers=set(), visited=[])
    seen: set[fx.Node] = set()
    frontier = list(start)
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in quantizable:
            walk.layers.add(node)
            continue
        if node.op == "output":
            walk.reaches_output = True
        walk.visited.append(node)
        frontier.extend(step(node))
    return walk


def _downstream(node: fx.Node, quantizable: set[fx.Node], metadata: set[fx.Node]) -> _Walk:
    def users(n: fx.Node) -> list[fx.Node]:
        return [user for user in n.users if user not in metadata]
    return _walk(users(node), users, quantizable)


def _upstream(inputs: Iterable[fx.Node], quantizable: set[fx.Node],
              metadata: set[fx.Node]) -> _Walk:
    def sources(n: fx.Node) -> list[fx.Node]:
        return [source for source in n.all_input_nodes if source not in metadata]
    return _walk([n for n in inputs if n not in metadata], sources, quantizable)


def _reads_norm_output(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    source = node.args[0] if node.args else None
    while isinstance(source, fx.Node) and _is_pass_through(graph_module, source):
        source = source.args[0] if source.args else None
    return isinstance(source, fx.Node) and _is_norm(graph_module, source)


def _owner_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack)) if stack else ""


def _layer_name(node: fx.Node, layer_type: LayerType, taken: set[str]) -> str:
    if node.op == "call_module":
        return str(node.target)
    owner = _owner_path(node)
    base = f"{owner}.{layer_type.value}" if owner else f"{layer_type.value}"
    name, suffix = base, 1
    while name in taken:
        suffix += 1
        name = f"{base}_{suffix}"
    return name


def _count_macs(graph_module: fx.GraphModule, node: fx.Node, kind: LayerKind) -> int:
    """Multiply-accumulates per sample, from the shapes recorded by ShapeProp."""
    output_meta = node.meta.get("tensor_meta")
    if output_meta is None or not hasattr(output_meta, "shape"):
        return 0
    output_shape = tuple(output_meta.shape)
    batch = output_shape[0] if output_shape else 1
    output_numel = 1
    for size in output_shape:
        output_numel *= size
    per_sample = output_numel // max(batch, 1)
    if kind is LayerKind.LINEAR:
        return per_sample * _module(graph_module, node).in_features
    if kind is LayerKind.CONV2D:
        conv = _module(graph_module, node)
        kernel = conv.kernel_size[0] * conv.kernel_size[1]
        return per_sample * (conv.in_channels // conv.groups) * kernel
    first = node.args[0].meta.get("tensor_meta")
    return per_sample * (first.shape[-1] if first is not None else 0)


def _type_layers(graph_module: fx.GraphModule, kinds: dict[fx.Node, LayerKind]
                 ) -> dict[fx.Node, tuple[LayerType, str]]:
    # Walks stop at quantizable layers and at other learned convolutions (a transposed conv
    # in a detection pyramid), so a role is read from the nearest layers only.
    stops = set(kinds) | {n for n in graph_module.graph.nodes if n.op == "call_module" and isinstance(
        _module(graph_module, n), nn.modules.conv._ConvNd)}
    metadata = _metadata_nodes(graph_module.graph)
    types: dict[fx.Node, tuple[LayerType, str]] = {}
    upstream = {n: _upstream(n.all_input_nodes, stops, metadata) for n in kinds}
    downstream = {n: _downstream(n, stops, metadata) for n in kinds}

    for node, kind in kinds.items():
        if kind is not LayerKind.MATMUL:
            continue
        first_operand = _upstream([node.args[0]], stops, metadata)
        if any(_is_softmax(graph_module, n) for n in first_operand.visited):
            types[node] = (LayerType.ATTN_V, "structure")
        elif any(_is_softmax(graph_module, n) for n in downstream[node].visited):
            types[node] = (LayerType.ATTN_QK, "structure")
    attention = {n for n, (t, _) in types.items() if t in (LayerType.ATTN_QK, LayerType.ATTN_V)}

    for node, kind in kinds.items():
        if node in types:
            continue
        if not upstream[node].layers:
            layer_type = LayerType.PATCH_EMBED
        elif kind is LayerKind.LINEAR and downstream[node].layers & attention:
            layer_type = LayerType.QKV
        elif kind is LayerKind.LINEAR and any(
                types.get(n, (None,))[0] is LayerType.ATTN_V for n in upstream[node].layers):
            layer_type = LayerType.PROJ
        elif kind is LayerKind.LINEAR and any(
                _is_activation(graph_module, n) for n in downstream[node].visited) \
                and downstream[node].layers:
            layer_type = LayerType.FC1
        else:
            continue
        types[node] = (layer_type, "structure")

    for node, kind in kinds.items():
        if node in types:
            continue
        feeds_from_fc1 = any(types.get(n, (None,))[0] is LayerType.FC1
                             for n in upstream[node].layers)
        passes_activation = any(_is_activation(graph_module, n) for n in upstream[node].visited)
        if kind is LayerKind.LINEAR and feeds_from_fc1 and passes_activation:
            types[node] = (LayerType.FC2, "structure")
        elif kind is not LayerKind.MATMUL and not downstream[node].layers \
                and downstream[node].reaches_output:
            types[node] = (LayerType.HEAD, "structure")
        else:
            types[node] = _name_hint(node)
    return types


def _name_hint(node: fx.Node) -> tuple[LayerType, str]:
    if node.op == "call_module":
        last = str(node.target).rsplit(".", 1)[-1]
        hinted = _ROLE_NAME_HINTS.get(last)
        if hinted is not None:
            logger.warning("layer %s: graph structure gave no role, typed %s from its name",
                           node.target, hinted.value)
            return hinted, "name hint"
    return LayerType.OTHER, "structure"


def annotate_layers(graph_module: fx.GraphModule,
                    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor) -> list[LayerInfo]:
    """Find and type every quantizable layer, storing a ``LayerInfo`` in ``node.meta['lampq']``.

    ``example_inputs`` drive a shape-propagation pass that sizes each layer's MACs.
    Returns the layers in graph order.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    with torch.no_grad():
        ShapeProp(graph_module).propagate(*example_inputs)

    kinds = {}
    for node in graph_module.graph.nodes:
        kind = _node_kind(graph_module, node)
        if kind is not None:
            kinds[node] = kind
    types = _type_layers(graph_module, kinds)

    layers: list[LayerInfo] = []
    taken: set[str] = set()
    by_module: dict[str, LayerInfo] = {}
    for node, kind in kinds.items():
        layer_type, typed_by = types[node]
        module = _module(graph_module, node)
        if node.op == "call_module" and str(node.target) in by_module:
            # A module called more than once is one layer: one weight, one bit-width, summed MACs.
            shared = by_module[str(node.target)]
            shared.calls += 1
            shared.macs += _count_macs(graph_module, node, kind)
            node.meta[META_KEY] = shared
            continue
        name = _layer_name(node, layer_type, taken)
        taken.add(name)
        info = LayerInfo(
            name=name,
            node_name=node.name,
            kind=kind,
            layer_type=layer_type,
            weight_params=module.weight.numel() if module is not None else 0,
            out_channels=module.weight.shape[0] if module is not None else 0,
            macs=_count_macs(graph_module, node, kind),
            post_norm_input=kind is not LayerKind.MATMUL and _reads_norm_output(graph_module, node),
            typed_by=typed_by,
        )
        node.meta[META_KEY] = info
        layers.append(info)
        if node.op == "call_module":
            by_module[str(node.target)] = info

    counts: dict[str, int] = {}
    for info in layers:
        counts[info.layer_type.value] = counts.get(info.layer_type.value, 0) + 1
    logger.info("found %d quantizable layers: %s", len(layers),
                ", ".join(f"{count} {name}" for name, count in counts.items()))
    return layers


def layers_of(graph_module: fx.GraphModule) -> list[LayerInfo]:
    """Return the ``LayerInfo`` annotations of a graph module, in graph order (shared modules once)."""
    found: dict[int, LayerInfo] = {}
    for node in graph_module.graph.nodes:
        if META_KEY in node.meta:
            found.setdefault(id(node.meta[META_KEY]), node.meta[META_KEY])
    return list(found.values())
