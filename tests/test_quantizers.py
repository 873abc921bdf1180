"""Error bounds and edge cases of the simulated quantizers."""

from __future__ import annotations

import math

import pytest
import torch

from lampq_fx.quantize.quantizers import (
    ActivationQuantizer,
    check_bits,
    fake_quantize_log2,
    fake_quantize_uniform,
    quantize_weight_per_channel,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_weight_error_within_half_step(bits):
    torch.manual_seed(bits)
    weight = torch.randn(32, 64)
    dequant, scale = quantize_weight_per_channel(weight, bits)
    qmax = 2 ** (bits - 1) - 1
    clip = scale * qmax
    inside = weight.abs() <= clip[:, None]
    error = (weight - dequant).abs()
    assert torch.all(error[inside] <= scale.expand_as(weight.T).T[inside] / 2 + 1e-6)
    levels = torch.round(dequant / scale[:, None])
    assert torch.allclose(levels * scale[:, None], dequant, atol=1e-6)
    assert levels.abs().max() <= qmax


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_mse_clip_beats_minmax(bits):
    torch.manual_seed(0)
    weight = torch.randn(16, 256)
    weight[:, 0] = 8.0  # one outlier per channel makes min-max clipping wasteful
    dequant, _ = quantize_weight_per_channel(weight, bits)
    qmax = 2 ** (bits - 1) - 1
    minmax_scale = weight.abs().amax(dim=1, keepdim=True) / qmax
    minmax = torch.clamp(torch.round(weight / minmax_scale), -qmax, qmax) * minmax_scale
    assert (weight - dequant).pow(2).sum() <= (weight - minmax).pow(2).sum() + 1e-6


def test_weight_error_falls_with_bits():
    torch.manual_seed(1)
    weight = torch.randn(8, 128)
    errors = [float((quantize_weight_per_channel(weight, b)[0] - weight).pow(2).mean()) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    # A 1-bit increase divides the error by about 4 once clipping no longer dominates.
    assert 2.5 < errors[-2] / errors[-1] < 6


def test_uniform_in_range_error_bound():
    x = torch.linspace(-1.0, 3.0, 1001)
    scale, zero_point = torch.tensor(4.0 / 15), torch.tensor(round(1.0 / (4.0 / 15)))
    q = fake_quantize_uniform(x, scale, zero_point, 4)
    inside = (x >= -zero_point * scale) & (x <= (15 - zero_point) * scale)
    assert torch.all((q - x).abs()[inside] <= scale / 2 + 1e-6)
    assert len(torch.unique(q)) <= 16


def test_log2_zeros_and_powers_of_two():
    x = torch.tensor([0.0, 1.0, 0.5, 0.25, 2.0 ** -20, 0.3, 0.0])
    q = fake_quantize_log2(x, torch.tensor(1.0), 4)
    assert torch.isfinite(q).all()
    assert q[0] == 0
    assert q[-1] == 0
    assert torch.equal(q[1:4], x[1:4])
    assert q[4] == 0  # below the smallest 4-bit level 2^-15
    assert q[5] == 0.25  # log2(0.3) = -1.74 rounds to -2


def test_log2_gradient_finite_at_zero():
    x = torch.tensor([0.0, 0.2, 0.8], requires_grad=True)
    fake_quantize_log2(x, torch.tensor(1.0), 3).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad, torch.ones(3))


@pytest.mark.parametrize("bits,per_octave", [(4, 1), (5, 2), (6, 4), (8, 16)])
def test_log2_relative_error_bound(bits, per_octave):
    torch.manual_seed(0)
    x = torch.rand(1000) * 0.99 + 0.01
    q = fake_quantize_log2(x, torch.tensor(1.0), bits)
    # Rounding the exponent to the nearest 1/m octave keeps q within a factor 2^(1/2m) of x.
    ratio = q / x
    bound = 2 ** (0.5 / per_octave)
    assert ratio.min() >= 1 / bound - 1e-6
    assert ratio.max() <= bound + 1e-6
    assert ratio.max() > 2 ** (0.3 / per_octave)  # the bound is tight, not loose


def test_activation_quantizer_needs_calibration():
    quantizer = ActivationQuantizer()
    quantizer.bits = 8
    with pytest.raises(RuntimeError, match="not calibrated"):
        quantizer(torch.randn(4, 8))


def test_activation_quantizer_calibrated_error():
    torch.manual_seed(0)
    quantizer = ActivationQuantizer()
    quantizer.observing = True
    data = torch.randn(64, 10, 32)
    quantizer(data)
    quantizer.observing = False
    errors = [quantizer.mean_squared_error(b) for b in (4, 6, 8)]
    assert errors[0] > errors[1] > errors[2] > 0
    # 8-bit per-tensor over a ~[-4.5, 4.5] range: step ≈ 0.035, uniform error variance step²/12.
    step = float(data.max() - data.min()) / 255
    assert errors[2] < step ** 2 / 12 * 1.5


def test_per_channel_handles_outlier_channels():
    torch.manual_seed(0)
    rows = torch.randn(2048, 16)
    rows[:, 3] *= 50.0  # a LayerNorm output with one outlier channel
    per_tensor, per_channel = ActivationQuantizer(), ActivationQuantizer(per_channel=True)
    for quantizer in (per_tensor, per_channel):
        quantizer.observing = True
        quantizer(rows)
        quantizer.observing = False
    normal = [c for c in range(16) if c != 3]
    error_tensor = (per_tensor.quantize(rows, 4) - rows)[:, normal].pow(2).mean()
    error_channel = (per_channel.quantize(rows, 4) - rows)[:, normal].pow(2).mean()
    assert error_channel < error_tensor / 10


@pytest.mark.parametrize("bad", [1, 9, 0, 4.0, "4", True])
def test_check_bits_rejects(bad):
    with pytest.raises(ValueError, match="integer from 2 to 8"):
        check_bits(bad)


def test_uniform_w8a8_close_to_float(tiny_vit):
    import lampq_fx as lq
    torch.manual_seed(0)
    images = torch.randn(64, 1, 8, 8)
    labels = torch.randint(0, 5, (64,))
    session = lq.LampQSession(tiny_vit, lq.CalibrationSet(images, labels), progress=False)
    session.calibrate()
    with torch.no_grad():
        reference = session.graph_module(images)
        session.apply({layer.name: (8 if layer.has_weight else None, 8) for layer in session.layers})
        quantized = session.graph_module(images)
        session.apply(None)
    relative = float((quantized - reference).norm() / reference.norm())
    assert relative < 0.05
    assert not math.isnan(relative)
