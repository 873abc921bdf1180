"""Dataset errors, atomic output, the Fisher cache and the budget parser."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lampq_fx as lq
from lampq_fx import io as lampq_io
from lampq_fx.data import DataError, check_splits, open_image_folder
from lampq_fx.pipeline import parse_budget


def _image_folder(root: Path, classes=("a", "b"), per_class=2) -> Path:
    for split in ("train", "test"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = (np.random.default_rng(index).random((8, 8, 3)) * 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def _to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


def test_missing_folder_error(tmp_path):
    with pytest.raises(DataError, match="not found; --data expects an ImageFolder"):
        open_image_folder(tmp_path / "nowhere", "train", _to_tensor)


def test_missing_split_error(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=r"test not found"):
        open_image_folder(tmp_path, "test", _to_tensor)


def test_empty_folder_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=f"no images found in {tmp_path / 'train'}"):
        open_image_folder(tmp_path, "train", _to_tensor)


def test_unreadable_image_named(tmp_path):
    root = _image_folder(tmp_path)
    broken = root / "train" / "a" / "broken.png"
    broken.write_bytes(b"this is not a png")
    dataset = open_image_folder(root, "train", _to_tensor)
    index = [Path(p).name for p, _ in dataset.samples].index("broken.png")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        dataset[index]


def test_class_mismatch_error(tmp_path):
    root = _image_folder(tmp_path)
    (root / "test" / "c").mkdir()
    Image.new("RGB", (8, 8)).save(root / "test" / "c" / "x.png")
    train = open_image_folder(root, "train", _to_tensor)
    test = open_image_folder(root, "test", _to_tensor)
    with pytest.raises(DataError, match=r"only in test \['c'\]"):
        check_splits(train, test, 10, root)


def test_too_many_classes_error(tmp_path):
    root = _image_folder(tmp_path, classes=("a", "b", "c"))
    train = open_image_folder(root, "train", _to_tensor)
    with pytest.raises(DataError, match="3 classes but the model outputs 2 logits"):
        check_splits(train, train, 2, root)


def test_calibration_set_shape_errors():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        lq.CalibrationSet(torch.randn(4, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        lq.CalibrationSet(torch.randn(4, 1, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        lq.CalibrationSet(torch.randn(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "allocation.json"
    lampq_io.write_json_atomic(path, {"version": 1})

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        lampq_io.write_json_atomic(path, {"version": 2})
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["allocation.json"]


def test_fisher_cache_reused(tiny_vit, tmp_path, monkeypatch):
    torch.manual_seed(0)
    calibration = lq.CalibrationSet(torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,)))
    first = lq.LampQSession(tiny_vit, calibration, cache_dir=tmp_path, progress=False)
    first.calibrate()
    traces = first.fisher()
    assert len(list(tmp_path.glob("lampq-*.json"))) == 1

    import lampq_fx.session as session_module

    def fail(*args, **kwargs):
        raise AssertionError("the Fisher pass ran again instead of using the cache")

    monkeypatch.setattr(session_module, "compute_fisher_traces", fail)
    second = lq.LampQSession(tiny_vit, calibration, cache_dir=tmp_path, progress=False)
    second.calibrate()
    cached = second.fisher()
    assert {n: t.weight for n, t in cached.items()} == pytest.approx({n: t.weight for n, t in traces.items()})

    other = lq.CalibrationSet(calibration.images + 1, calibration.labels)
    third = lq.LampQSession(tiny_vit, other, cache_dir=tmp_path, progress=False)
    third.calibrate()
    with pytest.raises(AssertionError, match="ran again"):
        third.fisher()  # different calibration data: a different cache entry


@pytest.mark.parametrize("text,kind,value", [
    ("4", "avg_weight_bits", 4.0), ("wbits=3.5", "avg_weight_bits", 3.5),
    ("mb=2.5", "size_mb", 2.5), ("gbops=1.5", "bops", 1.5e9), ("W4A4", "uniform_bops", 4.0),
])
def test_parse_budget(text, kind, value):
    spec = parse_budget(text)
    assert spec.kind == kind
    assert spec.value == value


def test_parse_budget_mixed_act_candidates():
    assert parse_budget("w4a4").act_bits == (4, 6, 8)
    assert parse_budget("w6a6").act_bits == (6, 8)


@pytest.mark.parametrize("text", ["fast", "wbits=-1", "w9a4", "size=3"])
def test_parse_budget_errors(text):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(text)


def test_atomic_write_file_mode(tmp_path):
    path = tmp_path / "report.md"
    lampq_io.write_text_atomic(path, "text")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_wrong_input_size_error(tiny_vit):
    # TinyViT's position embedding fits 8x8 images only.
    calibration = lq.CalibrationSet(torch.randn(2, 1, 12, 12), torch.zeros(2, dtype=torch.long))
    with pytest.raises(lq.TracingError, match=r"failed on example inputs of shape \[\(1, 1, 12, 12\)\]"):
        lq.LampQSession(tiny_vit, calibration, progress=False)
