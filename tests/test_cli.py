"""The lampq command end to end: embedded reference model, timm models, shared CIFAR-10."""

from __future__ import annotations

import json

import pytest
import torch

from lampq_fx.cli import main
from lampq_fx.reference import load_reference_model, load_reference_sample


@pytest.fixture(scope="module")
def reference_sample():
    return load_reference_sample()


def test_reference_model_accuracy(reference_sample):
    model = load_reference_model()
    with torch.no_grad():
        predictions = torch.cat([model(reference_sample["test_images"][i:i + 1000]).argmax(1)
                                 for i in range(0, 10000, 1000)])
    accuracy = float((predictions == reference_sample["test_labels"]).float().mean())
    assert accuracy >= 0.88
    assert len(reference_sample["calib_images"]) == 512
    assert torch.bincount(reference_sample["calib_labels"]).min() >= 50


def test_reference_w8a8_within_half_point(reference_sample):
    import lampq_fx as lq
    from lampq_fx.data import TensorBatches
    calibration = lq.CalibrationSet(reference_sample["calib_images"][:256], reference_sample["calib_labels"][:256])
    session = lq.LampQSession(load_reference_model(), calibration, progress=False)
    session.calibrate()
    test = TensorBatches(reference_sample["test_images"], reference_sample["test_labels"], 500)
    w8a8 = {layer.name: (8 if layer.has_weight else None, 8) for layer in session.layers}
    fp32, quantized = session.evaluate(test), session.evaluate(test, w8a8)
    assert abs(fp32 - quantized) <= 0.005


def test_cli_reference_small_run(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["quantize", "--budget", "wbits=4", "--calib-images", "64", "--eval-images", "500",
                 "--rounds", "1", "--out", str(out), "--no-progress", "--seed", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| W4 avg | lampq |" in printed
    assert "| W4 avg | uniform |" in printed
    allocation = json.loads((out / "w4-avg" / "allocation.json").read_text())
    assert allocation["strategy"] == "lampq"
    assert allocation["metrics"]["avg_weight_bits"] <= 4.0 + 1e-9
    assert allocation["solver"]["name"] in ("gurobi", "highs")
    assert (out / "w4-avg" / "allocation-uniform.json").is_file()
    assert (out / "w4-avg" / "bits_per_layer.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "FP32" in report
    assert "Seed 3" in report
    assert "torch 2.14.1" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calibration_images"] == 64


def test_cli_same_seed_same_allocation(tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["quantize", "--budget", "wbits=3", "--calib-images", "32", "--eval-images", "100",
                     "--rounds", "1", "--baseline", "none", "--out", str(out), "--no-progress"]) == 0
        runs.append(json.loads((out / "w3-avg" / "allocation.json").read_text())["layers"])
    assert runs[0] == runs[1]


def test_cli_infeasible_budget_exit_code(tmp_path, caplog):
    code = main(["quantize", "--budget", "wbits=1.5", "--calib-images", "16", "--eval-images", "50",
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 2
    assert "smallest feasible budget" in caplog.text
    assert not (tmp_path / "w1.5-avg" / "allocation.json").exists()


@pytest.mark.parametrize("name,extra", [
    ("deit_small_patch16_224", []),
    ("vit_small_patch14_dinov2", ["--img-size", "112"]),
    ("swin_tiny_patch4_window7_224", []),
])
def test_cli_timm_models_allocate(tmp_path, name, extra):
    out = tmp_path / "out"
    code = main(["quantize", "--model", name, *extra, "--calib-images", "2", "--batch-size", "2",
                 "--budget", "wbits=4", "--rounds", "0", "--baseline", "none", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    allocation = json.loads((out / "w4-avg" / "allocation.json").read_text())
    assert allocation["metrics"]["avg_weight_bits"] <= 4.0 + 1e-9
    types = {row["type"] for row in allocation["layers"]}
    assert {"patch_embed", "qkv", "attn_qk", "attn_v", "proj", "fc1", "fc2"} <= types


def test_cli_cifar10_folder(tmp_path, cifar10_dir):
    out = tmp_path / "out"
    code = main(["quantize", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "10",
                 "--data", str(cifar10_dir), "--calib-images", "32", "--eval-images", "100",
                 "--budget", "wbits=4", "--rounds", "0", "--out", str(out), "--no-progress"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calibration_images"] == 32
    assert "100 test images" in summary["task"]
    assert all(0.0 <= row["top1"] <= 1.0 for row in summary["results"])


def test_cli_bad_data_folder(tmp_path, caplog):
    code = main(["quantize", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--data",
                 str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    assert "not found; --data expects an ImageFolder directory" in caplog.text


def test_cli_checkpoint_errors(tmp_path, caplog):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    wrong = tmp_path / "wrong.pth"
    torch.save({"head.weight": torch.zeros(3, 3)}, wrong)
    common = ["quantize", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--out", str(tmp_path / "out"),
              "--no-progress"]
    assert main([*common, "--checkpoint", str(garbage)]) == 2
    assert f"cannot read checkpoint {garbage}" in caplog.text
    caplog.clear()
    assert main([*common, "--checkpoint", str(wrong)]) == 2
    assert f"checkpoint {wrong} does not fit vit_tiny_patch16_224" in caplog.text


@pytest.mark.parametrize("args,message", [
    (["--min-bits", "mlp=8"], "unknown layer type 'mlp'; valid types: patch_embed, qkv"),
    (["--min-bits", "head=9"], "head=9: bit-widths must be from 2 to 8"),
    (["--time-limit", "-5"], "expected a positive number, got -5"),
    (["--strategy", "nonsense"], "invalid choice: 'nonsense'"),
])
def test_cli_argument_errors(args, message, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["quantize", *args])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err
