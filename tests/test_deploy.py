"""Lowering to CPU kernels: the int4 kernel, per-layer agreement with the simulation, save/load, bench."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import TinyViT
from lampq_fx.deploy import (
    Int4WeightOnlyLinear,
    LoweredFileError,
    compare_with_simulation,
    load_lowered,
    lower_session,
    plan_lowering,
    save_lowered,
)
from lampq_fx.deploy.kernels import (
    Int8Linear,
    Int8PatchConv,
    dense_unpack_supported,
    int4_kernel_available,
    unpack_int4_codes,
)
from lampq_fx.deploy.attention import fuse_float_attention, fused_attention
from lampq_fx.deploy.lowering import FLOAT, INT4_WEIGHT_ONLY, INT8_STATIC, TorchAOFXBackend, op_table
from lampq_fx.quantize.quantizers import quantize_weight_per_channel
from lampq_fx.session import CalibrationSet, LampQSession

pytestmark = pytest.mark.skipif(not int4_kernel_available(), reason="this torch has no int4 CPU kernel")


def _dequantized_reference(q: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    scale = scales_and_zeros[..., 0].float().repeat_interleave(group, 0).T
    zero = scales_and_zeros[..., 1].float().repeat_interleave(group, 0).T
    return (q.float() - 8) * scale + zero


@pytest.mark.parametrize("rows", [1, 197])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_matches_dequantized_matmul(rows, group, dtype):
    generator = torch.Generator().manual_seed(rows + group)
    out_features, in_features = 64, 256
    q = torch.randint(0, 16, (out_features, in_features), generator=generator, dtype=torch.int32)
    scales_and_zeros = torch.stack([torch.rand(in_features // group, out_features, generator=generator) * 0.02 + 1e-3,
                                    torch.randn(in_features // group, out_features, generator=generator) * 0.01],
                                   dim=-1).to(dtype)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    result = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros).float()
    weight = _dequantized_reference(q, scales_and_zeros, group)
    reference = x.float() @ weight.T
    # FP32: summation order only. BF16: the output is rounded to 8 significant bits.
    bound = (x.float().abs() @ weight.abs().T) * (2 ** -7 if dtype == torch.bfloat16 else 1e-5)
    assert torch.all((result - reference).abs() <= bound + 1e-6)


def test_int4_dense_path_unpacks_torch_layout():
    generator = torch.Generator().manual_seed(5)
    for out_features in (64, 192):
        codes = torch.randint(0, 16, (out_features, 96), generator=generator, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        assert torch.equal(unpack_int4_codes(packed, out_features, 96).to(torch.int32), codes)
    assert dense_unpack_supported()
    weight = torch.randn(128, 256, generator=generator)
    module = Int4WeightOnlyLinear.from_float(weight, torch.randn(128, generator=generator), group_size=64)
    assert torch.equal(module.unpacked_weight().float(), module.dequantized_weight())
    x = torch.randn(40, 256, generator=generator)
    assert module.uses_dense_path(40)
    assert not module.uses_dense_path(15)
    dense = module(x)
    module.dense_min_rows = None  # the int4 kernel at every row count
    kernel = module(x)
    bound = (x.abs() @ module.dequantized_weight().abs().T) * 2 ** -7 + 1e-5  # BF16 activations and output
    assert torch.all((dense - kernel).abs() <= bound)
    # Per-channel codes (what lowering builds): integer codes in the matmul, FP32 scales on the outputs.
    dequantized, scale = quantize_weight_per_channel(weight, 4)
    codes = torch.round(dequantized / scale[:, None]).to(torch.int32)
    bias = torch.randn(128, generator=generator)
    per_channel = Int4WeightOnlyLinear.from_codes(codes, scale, bias, group_size=64)
    assert per_channel.uses_dense_path(40)
    reference = F.linear(x, dequantized, bias)
    bound = (x.abs() @ dequantized.abs().T) * 2 ** -6 + bias.abs() * 2 ** -7 + 1e-5  # BF16 input and outputs
    assert torch.all((per_channel(x) - reference).abs() <= bound)
    narrow = Int4WeightOnlyLinear.from_float(torch.randn(48, 64, generator=generator), None, group_size=32)
    assert not narrow.uses_dense_path(1000)  # 48 outputs: not torch's 64-channel blocks


def test_int4_weight_bytes_count_scales():
    codes = torch.zeros(64, 128, dtype=torch.int32)
    module = Int4WeightOnlyLinear.from_codes(codes, torch.ones(64), None, group_size=32)
    # 4-bit codes, BF16 scale and zero per group and channel, FP32 scale per channel.
    assert module.weight_bytes() == 64 * 128 // 2 + (128 // 32) * 64 * 2 * 2 + 64 * 4


def test_int4_codes_reproduce_simulated_weight():
    torch.manual_seed(0)
    weight = torch.randn(32, 64)
    dequantized, scale = quantize_weight_per_channel(weight, 4)
    codes = torch.round(dequantized / scale[:, None]).to(torch.int32)
    module = Int4WeightOnlyLinear.from_codes(codes, scale, torch.zeros(32), group_size=32)
    # Three BF16 roundings (scale, code × scale, kernel output), each at most 2^-9 relative.
    assert torch.all((module.dequantized_weight() - dequantized).abs() <= dequantized.abs() * 3 * 2 ** -9 + 1e-7)
    with pytest.raises(ValueError, match="out_features must be a multiple of 16"):
        Int4WeightOnlyLinear.from_codes(codes[:10], scale[:10], None, group_size=32)
    with pytest.raises(ValueError, match="int4 codes must lie in -8..7"):
        Int4WeightOnlyLinear.from_codes(codes * 3, scale, None, group_size=32)


@pytest.fixture(scope="module")
def wide_session():
    torch.manual_seed(0)
    model = TinyViT(dim=32, heads=2).eval()
    images = torch.randn(48, 1, 8, 8)
    with torch.no_grad():
        labels = model(images).argmax(-1)
    session = LampQSession(model, CalibrationSet(images, labels), batch_size=16, progress=False)
    session.calibrate()
    return session


def _mixed_bits(session):
    bits = {}
    for index, layer in enumerate(session.layers):
        bits[layer.name] = ((4 if index % 2 else 8), 8) if layer.has_weight else (None, 8)
    return bits


def test_plan_promotes_and_warns(wide_session, caplog):
    bits = {layer.name: (3, 6) if layer.has_weight else (None, 8) for layer in wide_session.layers}
    with caplog.at_level(logging.WARNING):
        plans = {p.name: p for p in plan_lowering(wide_session.layers, bits)}
    assert "change bit-width to fit a CPU kernel" in caplog.text
    assert plans["blocks.0.up"].kernel == INT4_WEIGHT_ONLY
    assert plans["blocks.0.up"].bits == (4, None)
    assert "no 3-bit kernel" in plans["blocks.0.up"].reason
    assert plans["alpha"].kernel == INT8_STATIC  # no int4 convolution
    assert plans["alpha"].bits == (8, 8)
    assert plans["omega"].bits == (8, 8)
    assert "output width a multiple of 16" in plans["omega"].reason
    matmul = next(p for p in plans.values() if p.kind == "matmul")
    assert matmul.kernel == FLOAT
    assert matmul.bits == (None, None)


def _capture(module, names):
    captured, handles = {}, []
    for name in names:
        def hook(_module, inputs, output, name=name):
            captured[name] = (inputs[0], output)
        handles.append(module.get_submodule(name).register_forward_hook(hook))
    return captured, handles


def test_each_lowered_layer_matches_its_simulation(wide_session):
    lowered = lower_session(wide_session, _mixed_bits(wide_session))
    kernel_layers = [p for p in lowered.plans if p.kernel in (INT8_STATIC, INT4_WEIGHT_ONLY)]
    assert {p.kernel for p in kernel_layers} == {INT8_STATIC, INT4_WEIGHT_ONLY}
    captured, handles = _capture(lowered.module, [p.name for p in kernel_layers])
    with torch.no_grad():
        lowered.module(wide_session.calibration.images[:16])
    for handle in handles:
        handle.remove()
    for plan in kernel_layers:
        source = wide_session.traced.get_submodule(plan.name)
        weight, _ = quantize_weight_per_channel(source.weight, plan.bits[0])
        inputs, output = captured[plan.name]
        module = lowered.module.get_submodule(plan.name)
        if isinstance(module, (Int8Linear, Int8PatchConv)):
            # Float in, float out: the input quantizer is the simulation's own, the output is not requantized.
            quantizer = wide_session.modules[plan.name].input_quantizers[0]
            scale, zero_point = quantizer.quant_params(8)
            codes = torch.clamp(torch.round(inputs / scale) + zero_point, 0, 255)
            if isinstance(module, Int8PatchConv):
                reference = F.conv2d((codes - zero_point) * scale, weight, source.bias, source.stride)
                module, weight = module.linear, weight.flatten(1)
            else:
                reference = F.linear((codes - zero_point) * scale, weight, source.bias)
            if module.per_channel_input:  # the channel scales were folded into a requantized weight
                folded_error = (module.dequantized_weight() - weight * scale).abs()  # two int8 terms
                assert float(folded_error.max()) <= 0.5 * float(module.residual_scale.max()) + 1e-9, plan.name
                bound = (codes - zero_point).abs() @ folded_error.T + 1e-4
            else:
                assert torch.equal(module.dequantized_weight(), weight), plan.name
                bound = 1e-4 * (1 + reference.abs())
            assert torch.all((output - reference).abs() <= bound), plan.name
        elif plan.kernel == INT8_STATIC:  # a torch.ao convolution: quantized input and output
            x = inputs.dequantize()
            reference = F.conv2d(x, weight, source.bias, source.stride)
            # Integer accumulation is exact; only the output requantization rounds: half a step.
            step = output.q_scale()
            assert float((output.dequantize() - reference).abs().max()) <= 0.5 * step + 1e-5, plan.name
        else:
            reference = F.linear(inputs.to(torch.bfloat16).float(), weight, source.bias)
            bound = (inputs.abs().float() @ weight.abs().T) * 2 ** -6 + 1e-5  # BF16 scales and output
            assert torch.all((output - reference).abs() <= bound), plan.name
    assert {type(lowered.module.get_submodule(p.name)) for p in kernel_layers} == \
        {Int8Linear, Int8PatchConv, Int4WeightOnlyLinear}


def test_op_table_lists_float_ops(wide_session):
    lowered = lower_session(wide_session, {l.name: (8, 8) if l.has_weight else (None, None)
                                           for l in wide_session.layers})
    rows = {(row["op"], row["runs_on"]): row["count"] for row in op_table(lowered.module)}
    assert rows[("Int8Linear", "int8 (x86 oneDNN), per-tensor input, FP32 output")] == 4  # proj and fc2
    assert rows[("Int8Linear", "int8 (x86 oneDNN), per-channel input, FP32 output")] == 5  # after a LayerNorm
    assert rows[("Int8PatchConv", "int8 (x86 oneDNN), per-tensor input, FP32 output")] == 1
    assert rows[("LayerNorm", "float32")] == 5
    assert rows[("gelu", "float32")] == 2
    # q·kᵀ, scale, softmax and attn·v of each block run as one fused float call
    assert rows[("fused_attention", "float32")] == 2
    assert not any(op in ("matmul", "softmax", "mul") for op, _ in rows)
    unfused = lower_session(wide_session, {l.name: (8, 8) if l.has_weight else (None, None)
                                           for l in wide_session.layers},
                            backend=TorchAOFXBackend(fuse_attention=False))
    rows = {(row["op"], row["runs_on"]): row["count"] for row in op_table(unfused.module)}
    assert rows[("softmax", "float32")] == 2
    assert rows[("matmul", "float32")] == 4


def test_lowered_model_agrees_with_simulation(wide_session):
    lowered = lower_session(wide_session, _mixed_bits(wide_session))
    images = wide_session.calibration.images
    result = compare_with_simulation(wide_session, lowered, [(images, wide_session.calibration.labels)])
    assert result["images"] == 48
    assert result["top1_agreement"] >= 0.9
    assert result["mean_abs_diff"] < 0.05


def test_save_load_and_bad_files(wide_session, tmp_path):
    lowered = lower_session(wide_session, _mixed_bits(wide_session))
    path = save_lowered(tmp_path / "saved", lowered, {"format_version": 1})
    assert json.loads((tmp_path / "saved" / "allocation.json").read_text()) == {"format_version": 1}
    torch.manual_seed(0)
    fresh = TinyViT(dim=32, heads=2).eval()  # same architecture, same weights as the session's model
    example = wide_session.calibration.images[:1]
    reloaded = load_lowered(fresh, tmp_path / "saved", example)
    images = wide_session.calibration.images[:8]
    with torch.no_grad():
        assert torch.equal(reloaded(images), lowered(images))

    with pytest.raises(LoweredFileError, match=r"different model: layer alpha \(patch_embed, 512 weights\) in "
                                                r"the file is alpha \(patch_embed, 768 weights\) here"):
        load_lowered(TinyViT(dim=48, heads=2).eval(), path, example)
    payload = torch.load(path, weights_only=False)
    payload["version"] = 99
    torch.save(payload, tmp_path / "newer.pt")
    with pytest.raises(LoweredFileError, match="format version 99, newer"):
        load_lowered(fresh, tmp_path / "newer.pt", example)
    payload["version"] = 1
    torch.save(payload, tmp_path / "older.pt")
    with pytest.raises(LoweredFileError, match="format version 1, written by an older lampq_fx"):
        load_lowered(fresh, tmp_path / "older.pt", example)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(LoweredFileError, match="not a lampq_fx lowered model"):
        load_lowered(fresh, tmp_path / "other.pt", example)
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(LoweredFileError, match="cannot read"):
        load_lowered(fresh, tmp_path / "junk.pt", example)
    with pytest.raises(FileNotFoundError):
        load_lowered(fresh, tmp_path / "absent.pt", example)


def test_reference_lowering_agreement():
    from lampq_fx.data import TensorBatches
    from lampq_fx.reference import load_reference_model, load_reference_sample
    sample = load_reference_sample()
    calibration = CalibrationSet(sample["calib_images"][:128], sample["calib_labels"][:128])
    session = LampQSession(load_reference_model(), calibration, progress=False)
    session.calibrate()
    bits = {}
    for index, layer in enumerate(session.layers):
        bits[layer.name] = ((4 if index % 3 else 8), 8) if layer.has_weight else (None, 8)
    lowered = lower_session(session, bits)
    test = TensorBatches(sample["test_images"][:2000], sample["test_labels"][:2000], 500)
    result = compare_with_simulation(session, lowered, test)
    assert result["images"] == 2000
    assert result["top1_agreement"] >= 0.99
    assert abs(result["lowered_top1"] - result["simulated_top1"]) <= 0.01


def test_bench_command_writes_results(tmp_path):
    from lampq_fx.cli import main
    out = tmp_path / "bench"
    assert main(["bench", "--variants", "fp32,int8,int4", "--runs", "2", "--warmup", "0", "--batch-sizes", "2",
                 "--calib-images", "16", "--out", str(out)]) == 0
    record = json.loads((out / "bench.json").read_text())
    assert [row["variant"] for row in record["rows"]] == ["fp32", "int8", "int4"]
    assert record["threads"] == 2
    assert record["rows"][0]["batches"]["2"]["median_ms"] > 0
    assert record["rows"][2]["weight_ratio_vs_fp32"] < record["rows"][1]["weight_ratio_vs_fp32"] < 1
    assert "| layer_norm | float32 |" in (out / "bench.md").read_text()
    assert (out / "bench.png").stat().st_size > 0


def test_bench_and_kernel_bits_errors(tmp_path, capsys):
    from lampq_fx.cli import main
    assert main(["bench", "--variants", "fp32,fast", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--allocation", str(tmp_path / "absent.json"), "--out", str(tmp_path)]) == 2
    assert main(["bench", "--variants", "lampq", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        main(["quantize", "--kernel-bits", "3,8"])
    assert "CPU kernels exist for 4 and 8 bits only" in capsys.readouterr().err


@pytest.mark.parametrize("options, weight_bits, act_bits", [
    (["--kernel-bits", "4,8"], {4, 8}, {8}),
    (["--act-bits", "6,8"], {2, 3, 4, 5, 6, 8}, {6, 8}),
])
def test_quantize_with_restricted_widths(tmp_path, options, weight_bits, act_bits):
    from lampq_fx.cli import main
    out = tmp_path / "run"
    assert main(["quantize", "--budget", "wbits=5", "--calib-images", "32", "--eval-images", "100", "--rounds", "0",
                 "--baseline", "none", "--no-progress", "--out", str(out), *options]) == 0
    rows = json.loads((out / "w5-avg" / "allocation.json").read_text())["layers"]
    assert {row["weight_bits"] for row in rows if row["weight_bits"] is not None} <= weight_bits
    assert {row["act_bits"] for row in rows} <= act_bits


def test_int8_weight_bytes_count_each_weight_once(wide_session):
    lowered = lower_session(wide_session, {l.name: (8, 8) if l.has_weight else (None, None)
                                           for l in wide_session.layers})
    expected = 0
    for name, module in wide_session.traced.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):  # int8 codes, FP32 channel scales and bias
            lowered_module = lowered.module.get_submodule(name)
            # A layer after a LayerNorm (per-channel input) stores its folded weight as two int8 terms.
            terms = 2 if isinstance(lowered_module, Int8Linear) and lowered_module.per_channel_input else 1
            expected += terms * (module.weight.numel() + 4 * module.weight.shape[0]) + 4 * module.bias.numel()
        elif isinstance(module, torch.nn.LayerNorm):
            expected += 4 * (module.weight.numel() + module.bias.numel())
    model = wide_session.traced
    expected += 4 * (model.token.numel() + model.position.numel())
    # A torch.ao module's input scale is a float buffer of the graph; Int8Linear counts its own.
    scalars = sum(t.numel() * t.element_size() for n, t in lowered.module.named_buffers() if "_input_scale_" in n)
    assert lowered.weight_bytes() == expected + scalars


def test_bf16_float_parts(wide_session, tmp_path):
    bits = _mixed_bits(wide_session)
    lowered = lower_session(wide_session, bits, float_dtype=torch.bfloat16)
    module = lowered.module
    norms = [m for m in module.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.weight.dtype == torch.bfloat16 for m in norms)
    int8 = [m for m in module.modules() if isinstance(m, Int8Linear)]
    assert int8 and all(m.weight_scale.dtype == torch.float32 and m.bias.dtype == torch.float32 for m in int8)
    images = wide_session.calibration.images
    with torch.no_grad():
        output = module(images)
        reference = lower_session(wide_session, bits).module(images)
    assert output.dtype == torch.float32
    rows = {(row["op"], row["runs_on"]): row["count"] for row in lowered.op_table()}
    assert rows[("LayerNorm", "bfloat16")] == 5
    assert rows[("fused_attention", "bfloat16")] == 2
    plans = lowered.plan_table()
    assert "| a8 | abf16 | bfloat16 |" in plans  # the attention matmuls' activations run in BF16
    assert "w4abf16" in plans
    assert "w4afp32" in lower_session(wide_session, bits, int4_dtype=torch.float32).plan_table()
    # BF16 keeps 8 significant bits: logits move by a few percent of their spread, not more.
    assert float((output - reference).abs().max()) <= 0.05 * float(reference.abs().max())
    result = compare_with_simulation(wide_session, lowered, [(images, wide_session.calibration.labels)])
    assert result["top1_agreement"] >= 0.9
    save_lowered(tmp_path / "bf16", lowered)
    again = load_lowered(TinyViT(dim=32, heads=2).eval(), tmp_path / "bf16", images[:1])
    assert again.float_dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(again(images), output)
    with pytest.raises(ValueError, match="float_dtype must be"):
        lower_session(wide_session, bits, float_dtype=torch.float16)


def test_int4_fp32_path_matches_simulation(wide_session):
    generator = torch.Generator().manual_seed(9)
    for out_features in (64, 48):  # torch's 64-channel blocks, and codes recovered through the kernel
        weight = torch.randn(out_features, 128, generator=generator)
        dequantized, scale = quantize_weight_per_channel(weight, 4)
        codes = torch.round(dequantized / scale[:, None]).to(torch.int32)
        bias = torch.randn(out_features, generator=generator)
        module = Int4WeightOnlyLinear.from_codes(codes, scale, bias, group_size=32)
        module.dense_dtype = torch.float32
        x = torch.randn(5, 128, generator=generator)
        assert torch.allclose(module(x), F.linear(x, dequantized, bias), rtol=1e-5, atol=1e-5)
    lowered = lower_session(wide_session, _mixed_bits(wide_session), int4_dtype=torch.float32)
    images = wide_session.calibration.images
    result = compare_with_simulation(wide_session, lowered, [(images, wide_session.calibration.labels)])
    exact = compare_with_simulation(wide_session, lower_session(wide_session, _mixed_bits(wide_session)),
                                    [(images, wide_session.calibration.labels)])
    assert result["mean_abs_diff"] < exact["mean_abs_diff"]  # no BF16 rounding left in the int4 layers
    assert result["max_abs_diff"] < 1e-3


def _explicit_attention(q, k, v, mask, scale):
    scores = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1) @ v


def test_fused_attention_matches_explicit_ops():
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=generator) for _ in range(3))
    additive = torch.randn(7, 7, generator=generator)
    for mask in (None, additive):
        assert torch.allclose(fused_attention(q, k, v, mask, 0.35), _explicit_attention(q, k, v, mask, 0.35),
                              rtol=1e-5, atol=1e-6)
    boolean = torch.rand(7, 7, generator=generator) > 0.5  # added to the scores, as the traced ops did
    assert torch.allclose(fused_attention(q, k, v, boolean, 0.35), _explicit_attention(q, k, v, boolean, 0.35),
                          rtol=1e-5, atol=1e-6)
    learned = torch.tensor(0.35)  # a tensor scale takes the explicit ops too
    assert torch.allclose(fused_attention(q, k, v, additive, learned), _explicit_attention(q, k, v, additive, 0.35),
                          rtol=1e-5, atol=1e-6)


class _Attention(torch.nn.Module):
    def __init__(self, keep_probs: bool = False) -> None:
        super().__init__()
        self.keep_probs = keep_probs
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, q, k, v):
        probs = ((q * 0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = self.drop(probs) @ v
        return (out, probs) if self.keep_probs else out


def test_fusion_rewrites_whole_chains_only():
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    traced = torch.fx.symbolic_trace(_Attention().eval())
    reference = traced(q, k, v)
    assert fuse_float_attention(traced) == 1
    assert [n.target for n in traced.graph.nodes if n.op == "call_function"] == [fused_attention]
    assert torch.allclose(traced(q, k, v), reference, rtol=1e-5, atol=1e-6)
    with_probs = torch.fx.symbolic_trace(_Attention(keep_probs=True).eval())  # the probabilities are an output
    assert fuse_float_attention(with_probs) == 0
    training = torch.fx.symbolic_trace(_Attention().train())  # dropout is live: not the fused op
    assert fuse_float_attention(training) == 0


class _WeightedScores(torch.nn.Module):
    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(tokens, tokens) + 0.5)

    def forward(self, q, k, v):
        return ((q @ k.transpose(-2, -1)) * self.weight).softmax(dim=-1) @ v


def test_fusion_keeps_per_score_weights():
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))  # 6 tokens, head size 4
    traced = torch.fx.symbolic_trace(_WeightedScores(6).eval())
    reference = traced(q, k, v)
    fuse_float_attention(traced)
    assert torch.allclose(traced(q, k, v), reference, rtol=1e-5, atol=1e-6)


def test_fused_lowering_matches_unfused(wide_session):
    bits = _mixed_bits(wide_session)
    fused = lower_session(wide_session, bits, int4_dtype=torch.float32)
    unfused = lower_session(wide_session, bits, int4_dtype=torch.float32,
                            backend=TorchAOFXBackend(fuse_attention=False))
    images = wide_session.calibration.images
    with torch.no_grad():
        difference = (fused(images) - unfused(images)).abs().max()
    assert float(difference) < 1e-4
    assert {row["op"]: row["count"] for row in fused.op_table()}["fused_attention"] == 2
    assert "fused_attention" not in {row["op"] for row in unfused.op_table()}
