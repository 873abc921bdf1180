"""Simulated (fake) quantizers for weights and activations at any bit-width from 2 to 8.

All quantizers round in the forward pass and pass gradients straight through
(straight-through estimator), so a simulated model can be scored by backpropagation.

Weights
    Symmetric, per output channel: ``q = clamp(round(w / s), -(2^(b-1) - 1), 2^(b-1) - 1)``
    with ``s = r · max|w_c| / (2^(b-1) - 1)``. The clipping ratio ``r`` is searched per
    channel on a grid in [0.5, 1] to minimise ``||w_c - s·q||²``.
Activations
    Asymmetric uniform with range ``[r·lo, r·hi]``, per tensor. Inputs that come
    straight from a LayerNorm are quantized per channel because a few of their
    channels carry outliers. RepQ-ViT (Li et al., ICCV 2023) uses the same per-channel
    ranges and folds them into the LayerNorm for deployment. ``lo``/``hi`` are the observed minimum and
    maximum over the calibration data and ``r`` minimises the squared error on a
    sample of calibration rows.
Post-softmax attention
    Log2-type quantizer: ``q = s · 2^(-k/m)`` with ``k = round(-m · log2(x / s))`` and
    ``q = 0`` when ``k ≥ 2^b`` (this includes exact zeros, which never produce NaN or
    inf). ``m = max(1, 2^(b-4))`` levels per octave keep the covered range at about
    16 octaves: at 4 bits this is the plain log2 quantizer (levels 1, 1/2, ... 2^-15),
    at 5 bits the log√2 quantizer of PTQ4ViT/RepQ-ViT, and at 8 bits the relative
    rounding error is at most 2^(1/32) - 1 ≈ 2.2% instead of the 41% of pure log2.
"""

from __future__ import annotations

import torch
from torch import nn

MIN_BITS = 2
MAX_BITS = 8
_CLIP_GRID = torch.linspace(0.5, 1.0, 26)
_ACT_CLIP_GRID = torch.linspace(0.3, 1.0, 29)
_RESERVOIR_ROWS = 2048


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bit-width must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def quantize_weight_per_channel(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight symmetrically per output channel with MSE-optimal clipping.

    Returns the dequantized weight (same shape) and the per-channel scales [out].
    Example: with bits=4 the integer grid is -7..7, so a channel whose best clipped
    maximum is 0.7 gets scale 0.1.
    """
    check_bits(bits)
    flat = weight.detach().reshape(weight.shape[0], -1).float()
    qmax = 2 ** (bits - 1) - 1
    max_abs = flat.abs().amax(dim=1).clamp_min(1e-12)
    best_error = torch.full_like(max_abs, float("inf"))
    best_scale = max_abs / qmax
    buffer = torch.empty_like(flat)
    for ratio in _CLIP_GRID.tolist():
        scale = ratio * max_abs / qmax
        torch.mul(flat, (1.0 / scale)[:, None], out=buffer)
        buffer.round_().clamp_(-qmax, qmax).mul_(scale[:, None]).sub_(flat)
        error = torch.linalg.vector_norm(buffer, dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
    dequant = torch.clamp(torch.round(flat / best_scale[:, None]), -qmax, qmax) * best_scale[:, None]
    return dequant.reshape(weight.shape).to(weight.dtype), best_scale


def fake_quantize_uniform(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                          bits: int) -> torch.Tensor:
    """Asymmetric uniform fake quantization to the grid 0..2^b-1, with a straight-through gradient."""
    levels = 2 ** bits - 1
    q = torch.clamp(round_ste(x / scale) + zero_point, 0, levels)
    return (q - zero_point) * scale


def log2_levels_per_octave(bits: int) -> int:
    return 2 ** max(0, bits - 4)


def fake_quantize_log2(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Log2-type fake quantization of non-negative inputs (post-softmax probabilities).

    Exact zeros and values below the smallest level ``s·2^(-(2^b - 1)/m)`` map to 0.
    """
    per_octave = log2_levels_per_octave(bits)
    positive = x > 0
    safe = torch.where(positive, x / scale, torch.ones_like(x))
    exponent = torch.round(-per_octave * torch.log2(safe)).clamp_min(0)
    keep = positive & (exponent < 2 ** bits)
    quantized = torch.where(keep, scale * torch.pow(2.0, -exponent / per_octave), torch.zeros_like(x))
    return x + (quantized - x).detach()


class ActivationQuantizer(nn.Module):
    """Observe an activation during calibration, then fake-quantize it at a chosen bit-width.

    ``mode`` is ``"uniform"`` or ``"log2"``; ``per_channel`` applies to uniform mode and
    uses the last dimension as the channel. The calibration state is a running
    min/max (per channel when ``per_channel``) and a reservoir of up to 2,048 rows of
    the last dimension, from which the clipping range is searched once per bit-width.
    """

    def __init__(self, mode: str = "uniform", per_channel: bool = False) -> None:
        super().__init__()
        if mode not in ("uniform", "log2"):
            raise ValueError(f"activation quantizer mode must be 'uniform' or 'log2', got {mode!r}")
        self.mode = mode
        self.per_channel = per_channel and mode == "uniform"
        self.bits: int | None = None
        self.observing = False
        self.register_buffer("running_min", torch.empty(0), persistent=True)
        self.register_buffer("running_max", torch.empty(0), persistent=True)
        self.register_buffer("reservoir", torch.empty(0), persistent=True)
        self._rows_seen = 0
        self._params: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._generator = torch.Generator().manual_seed(0)

    @property
    def calibrated(self) -> bool:
        return self.running_min.numel() > 0

    def reset_calibration(self, seed: int = 0) -> None:
        self.running_min = torch.empty(0)
        self.running_max = torch.empty(0)
        self.reservoir = torch.empty(0)
        self._rows_seen = 0
        self._params.clear()
        self._generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        if self.per_channel:
            batch_min, batch_max = rows.amin(dim=0), rows.amax(dim=0)
        else:
            batch_min, batch_max = rows.amin().reshape(1), rows.amax().reshape(1)
        if not self.calibrated:
            self.running_min, self.running_max = batch_min, batch_max
        else:
            self.running_min = torch.minimum(self.running_min, batch_min)
            self.running_max = torch.maximum(self.running_max, batch_max)

        # Reservoir sampling keeps a uniform sample of all rows seen so far.
        if not self.per_channel and self.reservoir.numel() and rows.shape[1] != self.reservoir.shape[1]:
            # A shared module gets inputs of several widths (pyramid levels). A per-tensor
            # range depends only on the values, so regroup them into rows of the reservoir's width.
            width = self.reservoir.shape[1]
            values = rows.reshape(-1)
            rows = values[:len(values) // width * width].reshape(-1, width)
        take = min(len(rows), _RESERVOIR_ROWS)
        picked = rows[torch.randperm(len(rows), generator=self._generator)[:take]]
        if self.reservoir.numel() == 0:
            self.reservoir = picked
        elif len(self.reservoir) < _RESERVOIR_ROWS:
            self.reservoir = torch.cat([self.reservoir, picked])[:_RESERVOIR_ROWS]
        else:
            keep_probability = _RESERVOIR_ROWS / (self._rows_seen + len(rows))
            replace = torch.rand(_RESERVOIR_ROWS, generator=self._generator) < keep_probability
            count = int(replace.sum())
            if count:
                self.reservoir[replace] = picked[torch.randint(0, take, (count,),
                                                               generator=self._generator)]
        self._rows_seen += len(rows)
        self._params.clear()

    def _search_uniform(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        levels = 2 ** bits - 1
        sample = self.reservoir
        low = torch.minimum(self.running_min, torch.zeros_like(self.running_min))
        high = torch.maximum(self.running_max, torch.zeros_like(self.running_max))
        best_error = None
        best = None
        for ratio in _ACT_CLIP_GRID.tolist():
            scale = ((high - low) * ratio / levels).clamp_min(1e-8)
            zero_point = torch.round(-low * ratio / scale)
            dequant = (torch.clamp(torch.round(sample / scale) + zero_point, 0, levels)
                       - zero_point) * scale
            error = (sample - dequant).pow(2).sum(dim=0)
            if not self.per_channel:
                error = error.sum().reshape(1)
            if best_error is None:
                best_error, best = error, (scale.clone(), zero_point.clone())
                continue
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best = (torch.where(better, scale, best[0]), torch.where(better, zero_point, best[1]))
        return best

    def quant_params(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (scale, zero_point) for uniform mode or (scale, 0) for log2 mode at ``bits``."""
        check_bits(bits)
        if not self.calibrated:
            raise RuntimeError(
                "activation quantizer is not calibrated: run lampq_fx.calibrate(model, batches) "
                "before setting activation bits"
            )
        if bits not in self._params:
            if self.mode == "log2":
                scale = self.running_max.clamp_min(1e-8)
                self._params[bits] = (scale, torch.zeros_like(scale))
            else:
                self._params[bits] = self._search_uniform(bits)
        return self._params[bits]

    def quantize(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        scale, zero_point = self.quant_params(bits)
        scale, zero_point = scale.to(x.device, x.dtype), zero_point.to(x.device, x.dtype)
        if self.mode == "log2":
            return fake_quantize_log2(x, scale, bits)
        return fake_quantize_uniform(x, scale, zero_point, bits)

    @torch.no_grad()
    def mean_squared_error(self, bits: int) -> float:
        """Mean squared quantization error per element on the calibration sample."""
        sample = self.reservoir
        return float((self.quantize(sample, bits) - sample).pow(2).mean())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            return x
        if self.bits is None:
            return x
        return self.quantize(x, self.bits)

    def extra_repr(self) -> str:
        granularity = "per-channel" if self.per_channel else "per-tensor"
        return f"mode={self.mode}, {granularity}, bits={self.bits}"
