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

Two ways to compute with the packed weight, picked per call by the row count M:

* M < ``dense_min_rows``: the int4 kernel itself, which reads 4-bit weights and suits
  few rows (decoding, small batches).
* M ≥ ``dense_min_rows``: unpack the 4-bit codes to a BF16 weight, W = (q - 8)·scale +
  zero computed in FP32 and rounded once, then run one dense BF16 matmul. Unpacking
  costs O(N·K) against the matmul's O(M·N·K), so it is cheap at ViT token counts, and
  the BF16 weight lives only during the call: stored weights stay 4-bit.

NOTE: on a 2-core AVX-512 machine without AMX, the int4 kernel took 44 ms for a
6304×384 by 384×1536 product with BF16 activations, FP32 took 52 ms and a dense BF16
matmul 20 ms; so int4 pays in memory, not time, unless the dense path is used.
The dense path reads torch's packed layout, which for N a multiple of 64 is blocks of
64 output channels: byte (block, k, j) holds channel 64·block + j in its low nibble and
channel 64·block + 32 + j in its high nibble. ``dense_unpack_supported`` checks this
once per process against the packing routine and turns the dense path off (with one
warning) if a torch version packs differently.

The kernel's fast path needs BF16 activations: with FP32 activations it falls back to
a slow reference path (measured in benchmarks/RESULTS.md). The module therefore casts
its input to BF16 and its output back to the input dtype.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

GROUP_SIZES = (32, 64, 128, 256)
INNER_K_TILES = 2
INT4_OUT_MULTIPLE = 16  # the packing routine needs N divisible by 16
PACK_BLOCK_N = 64  # output channels per block of torch's CPU int4 layout
DENSE_MIN_ROWS = 16


def int4_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def unpack_int4_codes(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Return the 4-bit codes q ∈ 0..15 [N, K] (uint8) from torch's CPU packed layout (N % 64 == 0)."""
    if out_features % PACK_BLOCK_N:
        raise ValueError(f"unpacking needs out_features a multiple of {PACK_BLOCK_N}, got {out_features}")
    blocks = packed.reshape(out_features // PACK_BLOCK_N, in_features, PACK_BLOCK_N // 2)
    codes = torch.cat([blocks & 0xF, blocks >> 4], dim=2)  # [blocks, K, 64]
    return codes.transpose(1, 2).reshape(out_features, in_features)


def unpack_int4_centered(packed: torch.Tensor, out_features: int, in_features: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """Return q - 8 [N, K] in ``dtype`` from torch's packed layout, as a transposed view of a [K, N] tensor.

    Both nibbles of four bytes at a time are masked in int32. Each block of 32 channels
    is then copied into place with its conversion to ``dtype``. A 1536×384 weight takes
    about 0.3 ms on one core; the matmul it feeds at 3,152 rows takes 18 ms.
    """
    blocks = out_features // PACK_BLOCK_N
    words = packed.contiguous().view(torch.int32)
    low = (words & 0x0F0F0F0F).view(torch.uint8).reshape(blocks, in_features, PACK_BLOCK_N // 2)
    high = ((words >> 4) & 0x0F0F0F0F).view(torch.uint8).reshape(blocks, in_features, PACK_BLOCK_N // 2)
    transposed = torch.empty(in_features, blocks, 2, PACK_BLOCK_N // 2, dtype=dtype)
    transposed[:, :, 0].copy_(low.permute(1, 0, 2))
    transposed[:, :, 1].copy_(high.permute(1, 0, 2))
    return transposed.reshape(in_features, out_features).sub_(8).t()


@functools.cache
def dense_unpack_supported() -> bool:
    """True when ``unpack_int4_codes`` inverts this torch's packing routine (checked on random codes)."""
    if not int4_kernel_available():
        return False
    codes = torch.randint(0, 16, (2 * PACK_BLOCK_N, 64), generator=torch.Generator().manual_seed(0),
                          dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INNER_K_TILES)
    try:
        same = torch.equal(unpack_int4_codes(packed, *codes.shape).to(torch.int32), codes)
    except RuntimeError:  # a different packed shape
        same = False
    if not same:
        logger.warning("torch %s packs int4 weights in a layout lampq_fx does not know; int4 layers use the "
                       "int4 kernel at every row count (slower than BF16 at ViT token counts)", torch.__version__)
    return same


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
        # Rows at which a call unpacks the weight for one dense matmul; None: never.
        self.dense_min_rows: int | None = DENSE_MIN_ROWS
        # dtype of the dense matmul: BF16 (fast) or FP32 (exactly the simulated product, FP32 speed)
        self.dense_dtype = compute_dtype
        # FP32 scale per output channel when built from per-channel codes (the dense path uses it)
        self.register_buffer("channel_scale", torch.zeros(0))
        self._fp32_weight: torch.Tensor | None = None
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
        module.channel_scale = scale.detach().float().clone()
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

    def codes(self) -> torch.Tensor:
        """Return the stored 4-bit codes q ∈ 0..15 [N, K] as float.

        Read from torch's packed layout where it is known (N a multiple of 64), else
        recovered from the kernel's product with the identity, q = round(W / scale) + 8
        per group (exact: the kernel's rounding error is below half a step).
        """
        if self.out_features % PACK_BLOCK_N == 0 and dense_unpack_supported():
            return unpack_int4_codes(self.packed_weight, self.out_features, self.in_features).float()
        scales, zeros = self.scales_and_zeros.float().unbind(-1)
        grouped = self.dequantized_weight().reshape(self.out_features, -1, self.group_size)
        return (torch.round((grouped - zeros.T[:, :, None]) / scales.T[:, :, None]) + 8).reshape(
            self.out_features, self.in_features)

    def unpacked_weight(self) -> torch.Tensor:
        """Return the weight [N, K] in ``dense_dtype``, computed in FP32 from the codes and rounded once.

        Per-channel codes use the FP32 channel scales, so in FP32 the weight is exactly
        the simulated one. Group-wise weights use the stored BF16 scales and zeros.
        """
        if self.dense_dtype == torch.float32 and self._fp32_weight is not None:
            return self._fp32_weight
        codes = self.codes() - 8
        if self.channel_scale.numel():
            weight = codes * self.channel_scale[:, None]
        else:
            scales, zeros = self.scales_and_zeros.float().unbind(-1)  # [K / G, N] each
            grouped = codes.reshape(self.out_features, -1, self.group_size)
            weight = (grouped * scales.T[:, :, None] + zeros.T[:, :, None]).reshape(self.out_features, -1)
        if self.dense_dtype == torch.float32 and not (self.out_features % PACK_BLOCK_N == 0 and
                                                      dense_unpack_supported()):
            self._fp32_weight = weight  # recovering the codes is slow: keep this weight (FP32 mode only)
        return weight.to(self.dense_dtype)

    def uses_dense_path(self, rows: int) -> bool:
        if self.dense_dtype == torch.float32:  # the kernel has no FP32 fast path: always dense
            return True
        if self.out_features % PACK_BLOCK_N or not dense_unpack_supported():
            return False
        return self.dense_min_rows is not None and rows >= self.dense_min_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        if self.uses_dense_path(rows.shape[0]):
            if self.dense_dtype != torch.float32 and self.channel_scale.numel():
                # Per-channel codes: multiply by the integer codes (exact in BF16), scale the outputs.
                centered = unpack_int4_centered(self.packed_weight, self.out_features, self.in_features,
                                                self.dense_dtype)
                out = F.linear(rows.to(self.dense_dtype), centered)  # rounded once, in BF16
                # One new tensor in the output dtype, then scale and bias in place: a fresh
                # large tensor costs page faults, which cost more than the arithmetic.
                out = out.to(x.dtype)
                scale = self.channel_scale.to(x.dtype)
                if self.bias is None:
                    return out.mul_(scale).reshape(*shape[:-1], self.out_features)
                out = torch.addcmul(self.bias.to(x.dtype), out, scale, out=out)
                return out.reshape(*shape[:-1], self.out_features)
            out = F.linear(rows.to(self.dense_dtype), self.unpacked_weight())
        else:
            flat = rows.to(self.compute_dtype)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed_weight, self.group_size,
                                                             self.scales_and_zeros)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, compute_dtype={self.compute_dtype}, dense_dtype={self.dense_dtype}")

    def weight_bytes(self) -> int:
        """Count the packed codes, the BF16 group scales and zeros and the FP32 channel scales."""
        return self.packed_weight.numel() + self.scales_and_zeros.numel() * self.scales_and_zeros.element_size() + \
            self.channel_scale.numel() * 4


def onednn_int8_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise") and \
        hasattr(torch.ops.onednn, "qlinear_prepack")


class Int8Linear(nn.Module):
    """``y = x Wᵀ + b`` with int8 activations and weights on oneDNN's x86 GEMM, FP32 output.

    The input is quantized to uint8 with the simulated quantizer's parameters, per
    tensor (scale s, zero point z) or per channel (s_c, z_c). The output stays FP32:
    nothing is requantized after the GEMM. A per-channel input has no per-tensor GEMM, so
    its scales move into the weight, which is quantized again per output channel:

        Σ_c W[n, c] · s_c · (q_c - z_c) = Σ_c W'[n, c] · q_c - Σ_c W'[n, c] · z_c,   W' = W · diag(s)

    (the same identity RepQ-ViT uses to fold LayerNorm ranges). The GEMM then takes q
    with scale 1 and zero point 0, and the last sum goes into the bias. Per-tensor
    inputs keep the simulated weight codes unchanged.

    Folding a wide spread of channel scales into one int8 row would round the columns
    of small-range channels coarsely. W' is therefore stored as two int8 terms,
    W' ≈ W_hi + W_lo, where W_lo is the per-row quantized remainder. The layer runs two
    GEMMs on the same input codes. The folded weight is then exact to about 2^-16 of each row's range, at
    twice the int8 weight bytes for these layers only.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        if not onednn_int8_available():
            raise RuntimeError(f"torch {torch.__version__} has no onednn.qlinear_pointwise kernel")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features))
        self.register_buffer("input_scale", torch.ones(1))
        self.register_buffer("input_zero_point", torch.zeros(1, dtype=torch.long))
        # The second int8 term of a folded per-channel weight (empty for per-tensor inputs).
        self.register_buffer("residual_codes", torch.zeros(0, in_features, dtype=torch.int8))
        self.register_buffer("residual_scale", torch.ones(0))
        self._packed: list[torch.Tensor] | None = None
        self._inverse_scale: torch.Tensor | None = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, input_scale: torch.Tensor,
                    input_zero_point: torch.Tensor) -> "Int8Linear":
        """Build from a float (already dequantized) weight [N, K] and the input quantizer's parameters."""
        from lampq_fx.quantize.quantizers import quantize_weight_per_channel
        out_features, in_features = weight.shape
        module = cls(in_features, out_features)
        weight = weight.detach().float()
        bias = torch.zeros(out_features) if bias is None else bias.detach().float()
        scale = input_scale.detach().float().reshape(-1)
        zero_point = torch.round(input_zero_point.detach().float().reshape(-1))
        if scale.numel() > 1:  # fold the channel scales into the weight, the zero points into the bias
            weight = weight * scale[None, :]
        dequantized, weight_scale = quantize_weight_per_channel(weight, 8)
        module.weight_codes = torch.round(dequantized / weight_scale[:, None]).to(torch.int8)
        module.weight_scale = weight_scale.float()
        if scale.numel() > 1:
            remainder, remainder_scale = quantize_weight_per_channel(weight - dequantized, 8)
            module.residual_codes = torch.round(remainder / remainder_scale[:, None]).to(torch.int8)
            module.residual_scale = remainder_scale.float()
            bias = bias - module.dequantized_weight() @ zero_point
        module.bias = bias
        module.input_scale, module.input_zero_point = scale, zero_point.long()
        return module

    @property
    def per_channel_input(self) -> bool:
        return self.input_scale.numel() > 1

    def quantize_input(self, rows: torch.Tensor) -> torch.Tensor:
        """Return the uint8 codes of FP32 rows [M, K].

        Per channel, the codes are round(x_c / s_c) + z_c clamped to 0..255. That equals a
        per-tensor quantization (scale 1, zero point 0) of x_c / s_c + z_c, computed with
        one fused multiply-add and torch's vectorized per-tensor quantizer instead of its
        slower per-channel one.
        """
        if self.per_channel_input:
            if self._inverse_scale is None:
                self._inverse_scale = 1.0 / self.input_scale
            shifted = torch.addcmul(self.input_zero_point.float(), rows, self._inverse_scale)
            quantized = torch.quantize_per_tensor(shifted, 1.0, 0, torch.quint8)
        else:
            quantized = torch.quantize_per_tensor(rows, float(self.input_scale), int(self.input_zero_point),
                                                  torch.quint8)
        return quantized.int_repr()

    def _gemm(self, codes: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        if self.per_channel_input:
            x_scale, x_zero_point = 1.0, 0
        else:
            x_scale, x_zero_point = float(self.input_scale), int(self.input_zero_point)
        return torch.ops.onednn.qlinear_pointwise(
            codes, x_scale, x_zero_point, packed, weight_scale, torch.zeros(self.out_features, dtype=torch.long),
            bias, 1.0, 0, torch.float32, "none", [], "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self._packed = [torch.ops.onednn.qlinear_prepack(codes, None)
                            for codes in (self.weight_codes, self.residual_codes) if len(codes)]
        shape = x.shape
        codes = self.quantize_input(x.reshape(-1, self.in_features).float().contiguous())
        out = self._gemm(codes, self._packed[0], self.weight_scale, self.bias)
        if len(self._packed) > 1:
            out.add_(self._gemm(codes, self._packed[1], self.residual_scale, None))
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """Return the FP32 weight the GEMMs compute with, per input code (channel scales folded in)."""
        weight = self.weight_codes.float() * self.weight_scale[:, None]
        if len(self.residual_codes):
            weight = weight + self.residual_codes.float() * self.residual_scale[:, None]
        return weight

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("input_scale", "input_zero_point", "residual_codes", "residual_scale"):  # take saved shapes
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        self._packed, self._inverse_scale = None, None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        granularity = "per-channel" if self.per_channel_input else "per-tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, input {granularity} uint8"

    def weight_bytes(self) -> int:
        return self.weight_codes.numel() + self.residual_codes.numel() + \
            (self.weight_scale.numel() + self.residual_scale.numel()) * 4


class Int8PatchConv(nn.Module):
    """A patch-embedding Conv2d (kernel = stride, no padding) as an ``Int8Linear`` on flattened patches.

    Each output position reads one p×p patch, so the convolution is a matmul of the
    patches [B·H'·W', C·p·p] with the weight [N, C·p·p]. An int8 GEMM with FP32 output
    computes it with the simulation's per-tensor input range.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int]) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.linear = Int8Linear(in_channels * self.kernel_size[0] * self.kernel_size[1], out_channels)

    @staticmethod
    def supports(conv) -> bool:
        """True for a convolution whose windows tile the input: kernel = stride, no padding or dilation, 1 group."""
        def pair(value):
            return tuple(value) if isinstance(value, (tuple, list)) else (value, value)
        return pair(conv.kernel_size) == pair(conv.stride) and pair(conv.padding) == (0, 0) and \
            pair(conv.dilation) == (1, 1) and conv.groups == 1 and getattr(conv, "padding_mode", "zeros") == "zeros"

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, input_scale: torch.Tensor,
                    input_zero_point: torch.Tensor) -> "Int8PatchConv":
        out_channels, in_channels, height, width = weight.shape
        module = cls(in_channels, out_channels, (height, width))
        module.linear = Int8Linear.from_weight(weight.reshape(out_channels, -1), bias, input_scale, input_zero_point)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        kh, kw = self.kernel_size
        rows, columns = height // kh, width // kw
        x = x[:, :, :rows * kh, :columns * kw]  # the convolution drops a partial last window
        patches = x.reshape(batch, channels, rows, kh, columns, kw).permute(0, 2, 4, 1, 3, 5)
        out = self.linear(patches.reshape(batch, rows, columns, channels * kh * kw))
        return out.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"

    def weight_bytes(self) -> int:
        return self.linear.weight_bytes()
