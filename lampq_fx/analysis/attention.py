"""Traceable stand-ins for torch.nn attention modules.

torch.fx treats every ``torch.nn`` module as a leaf, so an ``nn.MultiheadAttention``
hides its fused input projection and both attention matmuls, and
``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` branch on tensor properties
in their fast-path checks, which symbolic tracing cannot follow. The classes here
compute the same function with the projection as an ``nn.Linear`` and the matmuls as
graph nodes, so the layer-typing pass finds them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.fx.wrap
def _additive_attention_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    batch: int,
    num_heads: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """Merge ``attn_mask`` and ``key_padding_mask`` into one additive float mask.

    Boolean masks mark positions that must not be attended (``True`` = masked), as in
    ``nn.MultiheadAttention``. The result broadcasts against scores of shape
    [batch, heads, query, key].
    """
    merged = None
    if attn_mask is not None:
        mask = attn_mask
        if mask.dtype == torch.bool:
            mask = torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))
        if mask.dim() == 3:  # [batch * heads, query, key]
            mask = mask.reshape(batch, num_heads, mask.shape[-2], mask.shape[-1])
        merged = mask.to(dtype)
    if key_padding_mask is not None:
        padding = key_padding_mask
        if padding.dtype == torch.bool:
            padding = torch.zeros_like(padding, dtype=dtype).masked_fill(padding, float("-inf"))
        padding = padding.to(dtype)[:, None, None, :]
        merged = padding if merged is None else merged + padding
    return merged


class DecomposedMultiheadAttention(nn.Module):
    """Self-attention equal to an ``nn.MultiheadAttention``, built from traceable parts.

    ``in_proj`` is the fused q/k/v projection (an ``nn.Linear`` with 3·E outputs) and
    ``out_proj`` the output projection; both share the original parameters' values.
    Only self-attention (query, key and value are the same tensor) is supported.
    """

    def __init__(self, source: nn.MultiheadAttention) -> None:
        super().__init__()
        if not source._qkv_same_embed_dim:
            raise NotImplementedError(
                "nn.MultiheadAttention with kdim/vdim different from embed_dim has separate "
                "q/k/v weights; lampq_fx decomposes only the fused-projection form"
            )
        if source.bias_k is not None or source.add_zero_attn:
            raise NotImplementedError(
                "nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported"
            )
        embed_dim = source.embed_dim
        self.num_heads = source.num_heads
        self.head_dim = embed_dim // source.num_heads
        self.batch_first = source.batch_first
        self.dropout = source.dropout
        self.scale = 1.0 / math.sqrt(self.head_dim)

        weight = source.in_proj_weight
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=source.in_proj_bias is not None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=source.out_proj.bias is not None)
        with torch.no_grad():
            self.in_proj.weight.copy_(weight)
            if source.in_proj_bias is not None:
                self.in_proj.bias.copy_(source.in_proj_bias)
            self.out_proj.weight.copy_(source.out_proj.weight)
            if source.out_proj.bias is not None:
                self.out_proj.bias.copy_(source.out_proj.bias)
        self.in_proj.to(device=weight.device, dtype=weight.dtype)
        self.out_proj.to(device=weight.device, dtype=weight.dtype)
        self.train(source.training)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if key is not query or value is not query:
            raise NotImplementedError(
                "lampq_fx decomposes nn.MultiheadAttention only for self-attention "
                "(query, key and value must be the same tensor)"
            )
        tokens = query if self.batch_first else query.transpose(0, 1)
        batch, length, embed_dim = tokens.shape

        qkv = self.in_proj(tokens)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if is_causal is True and attn_mask is None:
            attn_mask = torch.ones(length, length, dtype=torch.bool, device=scores.device).triu(1)
        if attn_mask is not None or key_padding_mask is not None:
            scores = scores + _additive_attention_mask(
                attn_mask, key_padding_mask, batch, self.num_heads, scores.dtype
            )
        attn = scores.softmax(dim=-1)
        attn = F.dropout(attn, p=self.dropout, training=self.training)
        out = (attn @ v).transpose(1, 2).reshape(batch, length, embed_dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)

        if not need_weights:
            return out, None
        return out, attn.mean(dim=1) if average_attn_weights else attn


class TraceableTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` without the fused fast path, so torch.fx can trace it."""

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class TraceableTransformerEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` without the nested-tensor fast path."""

    def forward(
        self,
        src: torch.Tensor,
        mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool | None = None,
    ) -> torch.Tensor:
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                           is_causal=is_causal is True)
        if self.norm is not None:
            output = self.norm(output)
        return output


def make_attention_traceable(model: nn.Module) -> int:
    """Swap torch.nn attention modules in ``model`` for traceable equivalents, in place.

    Also turns off fused scaled-dot-product attention in modules that expose a
    ``fused_attn`` switch (timm), so q·kᵀ and attn·v appear as matmul nodes.
    Returns the number of modules changed.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "fused_attn", None) is True:
            module.fused_attn = False
            changed += 1
        if type(module) is nn.TransformerEncoderLayer:
            module.__class__ = TraceableTransformerEncoderLayer
            changed += 1
        elif type(module) is nn.TransformerEncoder:
            module.__class__ = TraceableTransformerEncoder
            changed += 1

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.MultiheadAttention:
                setattr(parent, child_name, DecomposedMultiheadAttention(child))
                changed += 1
    return changed
