"""LampQ through the real neural-compressor 3.x API: quantize, prepare/convert, autotune."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("neural_compressor.torch.quantization")
from neural_compressor.torch.quantization import TuningConfig, autotune, convert, prepare, quantize  # noqa: E402

from conftest import TinyViT  # noqa: E402
from lampq_fx.allocation.space import average_weight_bits  # noqa: E402
from lampq_fx.inc import CalibrationRecorder, LampQConfig  # noqa: E402

IMAGES = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _model():
    torch.manual_seed(0)
    return TinyViT(dim=32, heads=2).eval()


def _calibrate(model):
    for start in range(0, len(IMAGES), 16):
        model(IMAGES[start:start + 16])


def test_quantize_returns_lampq_model():
    model = _model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    qmodel = quantize(model, LampQConfig(budget="wbits=4", calib_images=48, rounds=1), run_fn=_calibrate,
                      example_inputs=(IMAGES[:1],), inplace=False)
    allocation = qmodel.lampq_allocation
    assert allocation.strategy == "lampq"
    layers = [node.meta["lampq"] for node in qmodel.graph.nodes if "lampq" in node.meta]
    assert average_weight_bits(layers, allocation.choices) <= 4 + 1e-9
    assert qmodel(IMAGES[:3]).shape == (3, 5)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_prepare_then_convert_lowers():
    prepared = prepare(_model(), LampQConfig(budget="wbits=5", calib_images=32, rounds=0, lower=True),
                       example_inputs=(IMAGES[:1],))
    assert isinstance(prepared, CalibrationRecorder)
    _calibrate(prepared)
    assert prepared.recorded == 32  # capped at calib_images
    converted = convert(prepared)
    assert converted.lampq_allocation.budget.label == "W5 avg"
    for name, choice in converted.lampq_allocation.choices.items():
        if choice.weight_bits is not None:  # every weighted layer runs on an int4 or int8 kernel
            module = converted.get_submodule(name)
            on_kernel = type(module).__name__ in ("Int4WeightOnlyLinear", "Int8Linear", "Int8PatchConv") or \
                type(module).__module__.startswith("torch.ao.nn.quantized")
            assert on_kernel, f"{name} is {type(module)}"
    assert converted(IMAGES[:2]).shape == (2, 5)


def test_dict_config_and_bad_strategy():
    qmodel = quantize(_model(), {"lampq": {"budget": "wbits=6", "calib_images": 16, "rounds": 0}},
                      example_inputs=(IMAGES[:16],))
    assert qmodel.lampq_allocation.budget.label == "W6 avg"
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        prepare(_model(), LampQConfig(strategy="nope"), example_inputs=(IMAGES[:1],))


def _ladder():
    return [LampQConfig(budget=["wbits=3", "wbits=4", "wbits=5", "wbits=6"], calib_images=32, rounds=0)]


def _score_by_bits(scale):
    def evaluate(model):
        allocation = getattr(model, "lampq_allocation", None)
        return scale if allocation is None else scale * allocation.budget.value / 8
    return evaluate


def test_autotune_tolerance_is_relative():
    # Baseline 0.5, rungs score 0.1875, 0.25, 0.3125, 0.375. A relative loss of 0.3 needs
    # ≥ 0.35, first met at W6; an absolute loss of 0.3 would have stopped at W4 (≥ 0.2).
    best = autotune(_model(), TuningConfig(config_set=_ladder(), tolerable_loss=0.3),
                    eval_fn=_score_by_bits(0.5), run_fn=_calibrate, example_inputs=(IMAGES[:1],))
    assert best.lampq_allocation.budget.label == "W6 avg"


def test_autotune_stops_at_first_rung_within_tolerance():
    scores = []

    def evaluate(model):
        scores.append(_score_by_bits(1.0)(model))
        return scores[-1]
    best = autotune(_model(), TuningConfig(config_set=_ladder(), tolerable_loss=0.4),
                    eval_fn=evaluate, run_fn=_calibrate, example_inputs=(IMAGES[:1],))
    assert best.lampq_allocation.budget.label == "W5 avg"  # 5/8 = 0.625 ≥ 0.6, 4/8 is not
    assert scores == [1.0, 0.375, 0.5, 0.625]  # baseline, then the ladder from the smallest rung


def test_autotune_without_passing_rung_returns_best():
    best = autotune(_model(), TuningConfig(config_set=_ladder(), tolerable_loss=0.0),
                    eval_fn=_score_by_bits(1.0), run_fn=_calibrate, example_inputs=(IMAGES[:1],))
    assert best.lampq_allocation.budget.label == "W6 avg"


def test_tuning_ladder_is_smallest_first():
    rungs = [config.budget for config in LampQConfig.get_config_set_for_tuning().expand()]
    assert rungs == ["wbits=3", "wbits=3.5", "wbits=4", "wbits=5", "wbits=6", "wbits=8"]


def test_inc_allocation_equals_cli(tmp_path):
    from lampq_fx.cli import main
    from lampq_fx.reference import load_reference_model, load_reference_sample
    out = tmp_path / "cli"
    assert main(["quantize", "--budget", "wbits=4", "--calib-images", "64", "--eval-images", "100",
                 "--rounds", "1", "--baseline", "none", "--no-progress", "--out", str(out)]) == 0
    cli_bits = {row["name"]: (row["weight_bits"], row["act_bits"])
                for row in json.loads((out / "w4-avg" / "allocation.json").read_text())["layers"]}

    sample = load_reference_sample()

    def calibrate(model):
        model(sample["calib_images"][:64], targets=sample["calib_labels"][:64])
    qmodel = quantize(load_reference_model(), LampQConfig(budget="wbits=4", calib_images=64, rounds=1),
                      run_fn=calibrate, example_inputs=(sample["calib_images"][:1],))
    assert qmodel.lampq_allocation.bits() == cli_bits


def test_missing_package_message():
    code = ("import sys; sys.modules['neural_compressor'] = None\n"
            "try:\n    import lampq_fx.inc\nexcept ImportError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "pip install 'lampq-fx[inc]' (neural-compressor-pt==3.10)" in result.stdout
