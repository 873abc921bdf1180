"""Fuse the float attention of a lowered graph into one scaled-dot-product-attention call.

Tracing turns attention into explicit ops so that q·kᵀ and attn·v can be typed and
quantized. After lowering they stay float, because no integer kernel takes two
activations. As separate ops they cost time: the scale, the mask, the softmax and the
second matmul each read the [B, H, N, N] score tensor again. This pass
finds each chain

    out = dropout(softmax(mask(s · (q @ kᵀ)), dim=-1)) @ v

(s a number applied to q, or any scalar applied to the scores; the mask and the
inference-mode dropout optional)
and replaces it by ``fused_attention(q, k, v, mask, s)``, which calls
``F.scaled_dot_product_attention``: the same softmax(s·q·kᵀ + mask)·v, computed
block by block without storing the scores. Only rounding differs; the tests hold
fused and explicit FP32 results to 1e-5 relative.
Chains that differ from this shape, or whose intermediate results have other users,
are left as they are.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

_MATMULS = (operator.matmul, torch.matmul, torch.bmm)
_MASK_FUNCTIONS = ("maybe_add_mask",)  # timm: scores + mask when a mask is given
_MASK_BUILDERS = ("resolve_self_attn_mask",)  # timm: the additive mask, in the scores' dtype
# NOTE: the decomposed nn.MultiheadAttention adds its mask with a plain `+` and reads
# scores.dtype to build it, so a masked one is not fused: correct, but not faster.


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float | torch.Tensor) -> torch.Tensor:
    """Compute softmax(scale · q·kᵀ + mask)·v, on the fused kernel when the mask is float or absent.

    A mask of another dtype (boolean) is added to the scores as the traced model did.
    A tensor scale (a learned temperature, or weights per score) also takes the
    explicit ops, and multiplies the scores as the traced model did.
    """
    if (mask is None or mask.is_floating_point()) and not isinstance(scale, torch.Tensor):
        if mask is not None:
            mask = mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=float(scale))
    scores = (q @ k.transpose(-2, -1)) * scale  # a tensor scale may vary per score, so it scales the scores
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1) @ v


def _name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def _is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MATMULS) or \
        (node.op == "call_method" and node.target in ("matmul", "bmm"))


def _arg(node: fx.Node, index: int, keyword: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(keyword, default)


def _is_last_dim_softmax(node: fx.Node) -> bool:
    is_softmax = (node.op == "call_method" and node.target == "softmax") or \
        (node.op == "call_function" and node.target in (torch.softmax, F.softmax))
    return is_softmax and _arg(node, 1, "dim") == -1 and _arg(node, 2, "dtype") is None


def _is_inference_dropout(model: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and not module.training)
    if node.op == "call_function" and node.target is F.dropout:
        return _arg(node, 2, "training", True) is False or _arg(node, 1, "p", 0.5) == 0
    return False


def _scaled(node: fx.Node) -> tuple[fx.Node, float] | None:
    """Return (x, c) for ``x * c`` or ``c * x`` with a Python number c."""
    if node.op != "call_function" or node.target not in (operator.mul, torch.mul) or len(node.args) != 2:
        return None
    left, right = node.args
    if isinstance(left, fx.Node) and isinstance(right, (int, float)):
        return left, float(right)
    if isinstance(right, fx.Node) and isinstance(left, (int, float)):
        return right, float(left)
    return None


def _scaled_matmul(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """Return (q @ kᵀ, s) for ``(q @ kᵀ) * s`` with s computed in the graph (a head-size expression)."""
    if node.op != "call_function" or node.target not in (operator.mul, torch.mul) or len(node.args) != 2:
        return None
    left, right = node.args
    for scores, scale in ((left, right), (right, left)):
        if isinstance(scores, fx.Node) and _is_matmul(scores) and isinstance(scale, fx.Node) and \
                not _is_matmul(scale):
            return scores, scale
    return None


def _transposed_key(node: fx.Node) -> fx.Node | None:
    """Return k for ``k.transpose(-2, -1)``."""
    is_transpose = (node.op == "call_method" and node.target == "transpose") or \
        (node.op == "call_function" and node.target is torch.transpose)
    if is_transpose and len(node.args) == 3 and set(node.args[1:]) == {-2, -1}:
        return node.args[0]
    return None


def _match(model: fx.GraphModule, out: fx.Node) -> tuple[tuple, list[fx.Node], list[fx.Node]] | None:
    """Return the (q, k, v, mask, scale) of the attention chain that ends at ``out``, the
    nodes it replaces, and the mask builders that read the scores."""
    if not _is_matmul(out) or len(out.args) != 2:
        return None
    probs, v = out.args
    chain = []

    while isinstance(probs, fx.Node) and _is_inference_dropout(model, probs):
        chain.append(probs)
        probs = probs.args[0]
    if not isinstance(probs, fx.Node) or not _is_last_dim_softmax(probs):
        return None
    chain.append(probs)

    scores, mask, scale = probs.args[0], None, None
    if isinstance(scores, fx.Node) and scores.op == "call_function" and _name(scores) in _MASK_FUNCTIONS:
        chain.append(scores)
        scores, mask = scores.args[0], _arg(scores, 1, "attn_mask")
    if isinstance(scores, fx.Node) and _scaled(scores) is not None:
        chain.append(scores)
        scores, scale = _scaled(scores)
    elif isinstance(scores, fx.Node) and _scaled_matmul(scores) is not None:
        chain.append(scores)
        scores, scale = _scaled_matmul(scores)
    if not isinstance(scores, fx.Node) or not _is_matmul(scores) or len(scores.args) != 2:
        return None
    chain.append(scores)

    # timm builds the mask from the scores' dtype and device, so that reader is given q instead.
    mask_builders = [user for user in scores.users if user is mask and _name(user) in _MASK_BUILDERS]
    q, key_t = scores.args
    if not isinstance(key_t, fx.Node) or _transposed_key(key_t) is None:
        return None
    chain.append(key_t)
    k = _transposed_key(key_t)
    if scale is None and isinstance(q, fx.Node) and _scaled(q) is not None:
        chain.append(q)
        q, scale = _scaled(q)
    if any(len(node.users) != 1 + (len(mask_builders) if node is scores else 0) for node in chain):
        return None  # another op reads an intermediate result, so the explicit ops stay
    if mask_builders and not isinstance(q, fx.Node):
        return None
    return (q, k, v, mask, 1.0 if scale is None else scale), chain, mask_builders


def fuse_float_attention(model: fx.GraphModule) -> int:
    """Replace each float attention chain of ``model`` by ``fused_attention``; return how many."""
    graph = model.graph
    fused = 0
    for node in list(graph.nodes):
        found = _match(model, node)
        if found is None:
            continue
        arguments, chain, mask_builders = found
        scores = next(dead for dead in chain if _is_matmul(dead))
        for builder in mask_builders:
            builder.replace_input_with(scores, arguments[0])
        with graph.inserting_before(node):
            replacement = graph.call_function(fused_attention, arguments)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        for dead in chain:  # ordered from the output back to the inputs
            graph.erase_node(dead)
        fused += 1
    if fused:
        graph.lint()
        model.recompile()
    logger.debug("fused %d float attention chains into scaled-dot-product attention", fused)
    return fused
