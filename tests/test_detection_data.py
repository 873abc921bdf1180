"""Detection data: VOC → COCO → dataset round trip and COCOeval on ground truth."""

from __future__ import annotations

import json

import pytest
import torch

from lampq_fx.detection import DetectionDataError, coco_evaluate, from_coco, read_voc, to_coco
from lampq_fx.detection.evaluate import paired_bootstrap_ap

pytest.importorskip("pycocotools")

BOXES = {
    "img_a": [("cell", 10, 20, 49, 79), ("big", 100, 100, 199, 159)],
    "img_b": [("cell", 5, 5, 24, 24)],
    "img_c": [("big", 30, 40, 129, 99), ("cell", 200, 10, 239, 59), ("cell", 60, 150, 89, 189)],
}


def _write_voc(root, names=BOXES, split="train"):
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
    for image_id, objects in names.items():
        parts = [f"<annotation><filename>{image_id}.jpg</filename>"
                 "<size><width>320</width><height>240</height><depth>3</depth></size>"]
        for name, x1, y1, x2, y2 in objects:
            parts.append(f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                         f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
        (root / "Annotations" / f"{image_id}.xml").write_text("".join(parts) + "</annotation>")


def test_voc_reads_boxes_and_classes(tmp_path):
    _write_voc(tmp_path)
    dataset = read_voc(tmp_path, "train")
    assert dataset.classes == ["big", "cell"]
    assert len(dataset) == 3
    assert dataset.num_boxes == 6
    first = dataset[0]
    assert (first.width, first.height) == (320, 240)
    assert first.boxes[0].tolist() == [9.0, 19.0, 49.0, 79.0]  # VOC pixels are 1-based and inclusive
    assert first.labels.tolist() == [1, 0]


def test_voc_coco_round_trip(tmp_path):
    _write_voc(tmp_path)
    dataset = read_voc(tmp_path, "train")
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(to_coco(dataset)))
    again = from_coco(path)
    assert again.classes == dataset.classes
    for left, right in zip(dataset.records, again.records):
        assert left.image == right.image
        assert (left.width, left.height, left.image_id) == (right.width, right.height, right.image_id)
        assert torch.allclose(left.boxes, right.boxes)
        assert torch.equal(left.labels, right.labels)


def test_ground_truth_scores_ap_one(tmp_path):
    _write_voc(tmp_path)
    dataset = read_voc(tmp_path, "train")
    predictions = [{"boxes": r.boxes, "scores": torch.ones(len(r.boxes)), "labels": r.labels} for r in dataset.records]
    result = coco_evaluate(dataset, predictions)
    assert result["AP"] == pytest.approx(1.0)
    assert result["AP50"] == pytest.approx(1.0)
    assert result["per_class"] == {"big": pytest.approx(1.0), "cell": pytest.approx(1.0)}


def test_shifted_boxes_lose_strict_ap(tmp_path):
    _write_voc(tmp_path)
    dataset = read_voc(tmp_path, "train")
    # Shifting each box by 20% of its width keeps IoU ≈ 0.67: a hit at IoU 0.5, a miss at 0.75.
    predictions = []
    for record in dataset.records:
        shift = (record.boxes[:, 2] - record.boxes[:, 0]) * 0.2
        boxes = record.boxes.clone()
        boxes[:, 0] += shift
        boxes[:, 2] += shift
        predictions.append({"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": record.labels})
    result = coco_evaluate(dataset, predictions)
    assert result["AP50"] == pytest.approx(1.0)
    assert result["AP75"] == pytest.approx(0.0)


def test_paired_bootstrap_of_ap(tmp_path):
    _write_voc(tmp_path)
    dataset = read_voc(tmp_path, "train")
    truth = [{"boxes": r.boxes, "scores": torch.ones(len(r.boxes)), "labels": r.labels} for r in dataset.records]
    missing = [{**prediction, "scores": prediction["scores"][:0], "boxes": prediction["boxes"][:0],
                "labels": prediction["labels"][:0]} if index == 2 else prediction
               for index, prediction in enumerate(truth)]  # the third image's boxes are not found
    result = paired_bootstrap_ap(dataset, truth, missing, resamples=30, seed=1)
    expected = 1.0 - coco_evaluate(dataset, missing)["AP"]
    assert result["delta"] == pytest.approx(expected)
    assert 0.0 <= result["low"] <= result["high"] <= 1.0
    assert result["positive"] > 0.5  # every draw that contains the third image favours the truth
    same = paired_bootstrap_ap(dataset, truth, truth, resamples=10)
    assert (same["delta"], same["low"], same["high"], same["positive"]) == (0.0, 0.0, 0.0, 0.0)
    again = paired_bootstrap_ap(dataset, truth, missing, resamples=30, seed=1)
    assert again == result
    with pytest.raises(ValueError, match="2 and 3 predictions for 3 images"):
        paired_bootstrap_ap(dataset, truth[:2], truth)


def test_detection_data_errors(tmp_path):
    _write_voc(tmp_path)
    with pytest.raises(DetectionDataError, match=r"split file .*val.txt not found; splits in .*\['train'\]"):
        read_voc(tmp_path, "val")
    with pytest.raises(DetectionDataError, match=r"classes \['big'\] are not in \['cell'\]"):
        read_voc(tmp_path, "train", classes=["cell"])
    dataset = read_voc(tmp_path, "train")
    with pytest.raises(ValueError, match="2 predictions for 3 images"):
        coco_evaluate(dataset, [{}, {}])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DetectionDataError, match="cannot read COCO file"):
        from_coco(tmp_path / "bad.json")


def test_bccd_splits(bccd_dir):
    counts = {split: read_voc(bccd_dir, split) for split in ("train", "val", "test")}
    assert {split: len(d) for split, d in counts.items()} == {"train": 205, "val": 87, "test": 72}
    assert all(d.classes == ["Platelets", "RBC", "WBC"] for d in counts.values())
    assert sum(d.num_boxes for d in counts.values()) == 4888
    assert all(r.image.is_file() for r in counts["test"].records)
