"""Swap the annotated layers of a traced graph for quantizable modules, calibrate, set bits."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from lampq_fx.analysis.layer_types import META_KEY, LayerInfo, LayerKind, LayerType
from lampq_fx.quantize.modules import QuantConv2d, QuantLayerModule, QuantLinear, QuantMatMul

logger = logging.getLogger(__name__)


def _set_submodule(graph_module: fx.GraphModule, target: str, module: torch.nn.Module) -> None:
    parent_name, _, child_name = target.rpartition(".")
    parent = graph_module.get_submodule(parent_name) if parent_name else graph_module
    setattr(parent, child_name, module)


def prepare_quantization(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of an annotated graph module whose layers are quantizable modules.

    Linear and Conv2d modules are replaced under the same name; each attention matmul
    node becomes a call to a ``QuantMatMul`` registered under the layer's name. The
    ``node.meta['lampq']`` annotations carry over. With no bits set, the result
    computes exactly what the input computes.
    """
    prepared = copy.deepcopy(graph_module)
    graph = prepared.graph
    for node in list(graph.nodes):
        info: LayerInfo | None = node.meta.get(META_KEY)
        if info is None:
            continue
        if info.kind is LayerKind.MATMUL:
            module: QuantLayerModule = QuantMatMul(softmax_operand=info.layer_type is LayerType.ATTN_V)
            prepared.add_submodule(info.name, module)
            with graph.inserting_after(node):
                replacement = graph.call_module(info.name, args=tuple(node.args[:2]))
            replacement.meta = dict(node.meta)
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
        else:
            original = prepared.get_submodule(node.target)
            if isinstance(original, QuantLayerModule):
                continue  # a shared module, wrapped at its first call
            if info.kind is LayerKind.LINEAR:
                module = QuantLinear(original, per_channel_input=info.post_norm_input)
            else:
                module = QuantConv2d(original)
            _set_submodule(prepared, node.target, module)
        module.layer_name = info.name
        module.shared_calls = info.calls
    graph.lint()
    prepared.recompile()
    return prepared


def quant_modules(graph_module: fx.GraphModule) -> dict[str, QuantLayerModule]:
    """Return the quantizable modules of a prepared graph, keyed by layer name, in graph order."""
    modules: dict[str, QuantLayerModule] = {}
    for node in graph_module.graph.nodes:
        if META_KEY in node.meta and node.op == "call_module":
            module = graph_module.get_submodule(node.target)
            if isinstance(module, QuantLayerModule):
                modules[node.meta[META_KEY].name] = module
    return modules


@torch.no_grad()
def calibrate(graph_module: fx.GraphModule, batches: Iterable[torch.Tensor], *,
              seed: int = 0, progress: bool = True) -> int:
    """Record activation statistics of every quantizer on ``batches`` (images only).

    Calibration runs the float model: all bit-widths are cleared for the pass and
    restored afterwards. Any previous calibration is discarded. Returns the number of
    images seen.
    """
    modules = quant_modules(graph_module)
    saved = {name: (m.weight_bits, m.act_bits) for name, m in modules.items()}
    for index, module in enumerate(modules.values()):
        module.set_bits(None, None)
        for quantizer in module.input_quantizers:
            quantizer.reset_calibration(seed + index)
            quantizer.observing = True
    images_seen = 0
    was_training = graph_module.training
    graph_module.eval()
    try:
        for images in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
            graph_module(images)
            images_seen += len(images)
    finally:
        for module in modules.values():
            for quantizer in module.input_quantizers:
                quantizer.observing = False
        graph_module.train(was_training)
        for name, module in modules.items():
            module.set_bits(*saved[name])
    if images_seen == 0:
        raise ValueError("calibration received no images: the calibration set is empty")
    logger.info("calibrated %d activation quantizers on %d images",
                sum(len(m.input_quantizers) for m in modules.values()), images_seen)
    return images_seen


def apply_bits(graph_module: fx.GraphModule,
               bits: Mapping[str, tuple[int | None, int | None]]) -> None:
    """Set (weight bits, activation bits) per layer name; layers not named become float.

    Also records the bits in each node's ``meta['lampq']``.
    """
    modules = quant_modules(graph_module)
    unknown = sorted(set(bits) - set(modules))
    if unknown:
        raise KeyError(f"allocation names layers that the model does not have: {unknown[:5]}")
    for name, module in modules.items():
        weight_bits, act_bits = bits.get(name, (None, None))
        module.set_bits(weight_bits, act_bits)
    for node in graph_module.graph.nodes:
        info = node.meta.get(META_KEY)
        if info is not None:
            info.weight_bits, info.act_bits = bits.get(info.name, (None, None))
