"""Synthetic calibration images: the generator's loss, determinism, cache, and models without attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TinyViT
from lampq_fx.zeroshot import NoAttentionError, SyntheticConfig, SyntheticGenerator, synthetic_images

SMALL = SyntheticConfig(images=4, steps=12, lr=0.1, batch_size=4, pairs=64, seed=3)


def _model():
    torch.manual_seed(0)
    return TinyViT().eval()


def test_generator_lowers_its_loss():
    images, history = SyntheticGenerator(_model(), (1, 8, 8), SMALL).generate(progress=False)
    assert images.shape == (4, 1, 8, 8)
    assert history[-1] < history[0] - 0.1


def test_fixed_seed_gives_identical_images():
    first, _ = SyntheticGenerator(_model(), (1, 8, 8), SMALL).generate(progress=False)
    second, _ = SyntheticGenerator(_model(), (1, 8, 8), SMALL).generate(progress=False)
    assert torch.equal(first, second)
    other, _ = SyntheticGenerator(_model(), (1, 8, 8), SyntheticConfig(**{**SMALL.__dict__, "seed": 4})
                                  ).generate(progress=False)
    assert not torch.equal(first, other)


def test_cache_is_reused(tmp_path):
    first, facts = synthetic_images(_model(), (1, 8, 8), SMALL, cache_dir=tmp_path, progress=False)
    assert facts["from_cache"] is False
    second, again = synthetic_images(_model(), (1, 8, 8), SMALL, cache_dir=tmp_path, progress=False)
    assert again["from_cache"] is True
    assert again["path"] == facts["path"]
    assert torch.equal(first, second)
    changed = _model()
    with torch.no_grad():
        changed.omega.weight.add_(1.0)  # other weights: another cache entry
    _, third = synthetic_images(changed, (1, 8, 8), SMALL, cache_dir=tmp_path, progress=False)
    assert third["from_cache"] is False


def test_model_without_attention_errors():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    with pytest.raises(NoAttentionError, match="has no attention block .* use --calib noise or real data"):
        SyntheticGenerator(model, (1, 8, 8), SMALL)


@pytest.mark.parametrize("mode", ["synthetic", "noise"])
def test_cli_zero_shot_calibration(mode, tmp_path, monkeypatch):
    import json

    from lampq_fx.cli import main
    monkeypatch.setenv("LAMPQ_CACHE_DIR", str(tmp_path / "cache"))
    arguments = ["quantize", "--calib", mode, "--synthetic-steps", "2", "--calib-images", "8", "--eval-images", "100",
                 "--budget", "wbits=6", "--rounds", "0", "--baseline", "none", "--no-progress"]
    assert main([*arguments, "--out", str(tmp_path / "first")]) == 0
    summary = json.loads((tmp_path / "first" / "summary.json").read_text())
    assert summary["calibration"]["mode"] == mode
    assert summary["calibration_images"] == 8
    if mode == "synthetic":
        assert summary["calibration"]["from_cache"] is False
        assert main([*arguments, "--out", str(tmp_path / "second")]) == 0
        again = json.loads((tmp_path / "second" / "summary.json").read_text())
        assert again["calibration"]["from_cache"] is True


def test_inc_config_zero_shot():
    pytest.importorskip("neural_compressor.torch.quantization")
    from neural_compressor.torch.quantization import quantize

    from lampq_fx.inc import LampQConfig
    qmodel = quantize(_model(), LampQConfig(budget="wbits=6", calib="noise", calib_images=8, rounds=0),
                      example_inputs=(torch.randn(8, 1, 8, 8),))
    assert qmodel.lampq_allocation.budget.label == "W6 avg"
    with pytest.raises(ValueError, match="calib must be 'data', 'synthetic' or 'noise'"):
        quantize(_model(), LampQConfig(calib="webcam"), example_inputs=(torch.randn(2, 1, 8, 8),))
