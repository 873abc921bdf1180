"""Int4 weight-only linear layers on the CPU kernel ``aten._weight_int4pack_mm_for_cpu``.

The kernel multiplies activations X [M, K] by a packed 4-bit weight with group-wise
affine dequantization. For output channel n and input index k in group g = k // G:

    W[n, k] = (q[n, k] - 8) · scale[g, n] + zero[g, n],     q ∈ {0, …, 15}

Scales and zeros are stored as one tensor [K / G, N, 2]. Two ways to fill it:

* ``from_codes``: a per-channel symmetric 4-bit weight (codes c ∈ {-7, …, 7}, one
  scale per output channel, as the simulated quantizer produces) becomes q = c + 8,
  the channel scale repeated over every group and zero = 0. The dequantized weight
  is then exactly the simulated one, so lowering changes only the arithmetic.
* ``from_float``: group-wise asymmetric min/max quantization with group size G.

NOTE: on a 2-core AVX-512 machine without AMX the kernel took 44 ms for a
6304×384 by 384×1536 product with BF16 activations. FP32 took 52 ms and a dense BF16
matmul 20 ms, so int4 here saves memory, not time.

The kernel's fast path needs BF16 activations: with FP32 activations it falls back to
a slow reference path (measured in benchmarks/RESULTS.md). The module therefore casts
its input to BF16 and its output back to the input dtype.
"""

from __future__ import annotations

import torch
from torch import nn

GROUP_SIZES = (32, 64, 128, 256)
INNER_K_TILES = 2
INT4_OUT_MULTIPLE = 16  # the packing routine needs N divisible by 16


def int4_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def pick_group_size(in_features: int, preferred: int = 128) -> int:
    """Return the largest supported group size ≤ ``preferred`` that divides ``in_features``."""
    for size in sorted((g for g in GROUP_SIZES if g <= preferred), reverse=True):
        if in_features % size == 0:
            return size
    raise ValueError(f"in_features {in_features} is not a multiple of any int4 group size "
                     f"{GROUP_SIZES}; this layer cannot use the int4 kernel")


class Int4WeightOnlyLinear(nn.Module):
    """``y = x Wᵀ + b`` with W stored as packed 4-bit codes and BF16 group scales."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if not int4_kernel_available():
            raise RuntimeError(f"torch {torch.__version__} has no aten._weight_int4pack_mm_for_cpu kernel")
        if group_size not in GROUP_SIZES or in_features % group_size:
            raise ValueError(f"group_size must be one of {GROUP_SIZES} and divide in_features "
                             f"({in_features}), got {group_size}")
        if out_features % INT4_OUT_MULTIPLE:
            raise ValueError(f"out_features must be a multiple of {INT4_OUT_MULTIPLE} for the int4 "
                             f"kernel, got {out_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.compute_dtype = compute_dtype
        self.register_buffer("packed_weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros",
                             torch.zeros(in_features // group_size, out_features, 2, dtype=compute_dtype))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                   group_size: int | None = None) -> "Int4WeightOnlyLinear":
        """Pack symmetric per-channel codes [N, K] in -8..7 with channel scales [N]."""
        out_features, in_features = codes.shape
        if codes.min() < -8 or codes.max() > 7:
            raise ValueError("int4 codes must lie in -8..7")
        group_size = group_size or pick_group_size(in_features)
        module = cls(in_features, out_features, group_size, bias is not None)
        groups = in_features // group_size
        scales = scale.reshape(1, out_features).expand(groups, out_features)
        module._pack(codes.to(torch.int32) + 8, scales, torch.zeros_like(scales), bias)
        return module

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None,
                   group_size: int = 128) -> "Int4WeightOnlyLinear":
        """Group-wise asymmetric min/max 4-bit quantization of a float weight [N, K]."""
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, group_size, bias is not None)
        grouped = weight.detach().float().reshape(out_features, -1, group_size)
        low, high = grouped.amin(-1), grouped.amax(-1)
        scale = ((high - low) / 15).clamp_min(1e-8)
        q = torch.clamp(torch.round((grouped - low[..., None]) / scale[..., None]), 0, 15)
        zero = low + 8 * scale  # (q - 8) · scale + zero = q · scale + low
        module._pack(q.reshape(out_features, in_features).to(torch.int32), scale.T, zero.T, bias)
        return module

    def _pack(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.packed_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), INNER_K_TILES)
        self.scales_and_zeros = torch.stack([scales, zeros], dim=-1).to(self.compute_dtype).contiguous()
        if bias is not None:
            self.bias = bias.detach().float().clone()

    def dequantized_weight(self) -> torch.Tensor:
        """Return the FP32 weight [N, K] this layer computes with (for checks and references)."""
        eye = torch.eye(self.in_features, dtype=self.compute_dtype)
        columns = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed_weight, self.group_size,
                                                             self.scales_and_zeros)
        return columns.float().T.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features).to(self.compute_dtype)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed_weight, self.group_size,
                                                         self.scales_and_zeros)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, compute_dtype={self.compute_dtype}")

    def weight_bytes(self) -> int:
        return self.packed_weight.numel() + self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()
