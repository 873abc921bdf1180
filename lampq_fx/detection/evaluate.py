"""COCO-style box AP with pycocotools: AP (IoU 0.50:0.95), AP50, AP75, AP per class, and a paired bootstrap."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch

from lampq_fx.detection.data import DetectionDataset, to_coco


def _coco_tools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:
        raise ImportError("detection metrics need pycocotools: pip install 'lampq-fx[detection]'") from error
    return COCO, COCOeval


def coco_evaluate(dataset: DetectionDataset, predictions: Sequence[Mapping[str, torch.Tensor]]) -> dict:
    """Evaluate ``predictions`` (one dict of boxes [K, 4] xyxy, scores [K], labels [K] per image).

    Returns ``{"AP", "AP50", "AP75", "per_class": {name: AP}}`` with values in 0..1.
    With no predictions at all every AP is 0.
    """
    if len(predictions) != len(dataset):
        raise ValueError(f"{len(predictions)} predictions for {len(dataset)} images")
    COCO, COCOeval = _coco_tools()
    results = []
    for record, prediction in zip(dataset.records, predictions):
        boxes = prediction["boxes"].detach().float().reshape(-1, 4).tolist()
        for box, score, label in zip(boxes, prediction["scores"].tolist(), prediction["labels"].tolist()):
            results.append({"image_id": record.image_id, "category_id": int(label) + 1,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": float(score)})
    empty = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "per_class": {name: 0.0 for name in dataset.classes}}
    if not results:
        return empty
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
        truth = COCO()
        truth.dataset = to_coco(dataset)
        truth.createIndex()
        detections = truth.loadRes(results)
        evaluation = COCOeval(truth, detections, iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    precision = evaluation.eval["precision"]  # [IoU, recall, class, area, max detections]
    per_class = {}
    for index, name in enumerate(dataset.classes):
        values = precision[:, :, index, 0, -1]
        valid = values[values > -1]
        per_class[name] = float(np.mean(valid)) if valid.size else 0.0
    stats = evaluation.stats
    return {"AP": max(0.0, float(stats[0])), "AP50": max(0.0, float(stats[1])), "AP75": max(0.0, float(stats[2])),
            "per_class": per_class}


def paired_bootstrap_ap(dataset: DetectionDataset, first: Sequence[Mapping[str, torch.Tensor]],
                        second: Sequence[Mapping[str, torch.Tensor]], *, resamples: int = 200, seed: int = 0,
                        level: float = 0.95) -> dict:
    """Estimate how much of a box-AP difference between two detectors the test set supports.

    Both prediction lists cover the same images. Each of ``resamples`` draws n test
    images with replacement (repeated images get new ids) and scores both detectors on
    the draw, so the two APs share the same images:

        Δ* = AP(first | draw) − AP(second | draw)

    Returns the difference on the full set, the mean and the ``level`` percentile
    interval of Δ*, and the fraction of draws with Δ* > 0.
    """
    if len(first) != len(dataset) or len(second) != len(dataset):
        raise ValueError(f"{len(first)} and {len(second)} predictions for {len(dataset)} images; "
                         "give both detectors' predictions on every test image")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    generator = np.random.default_rng(seed)
    deltas = []
    for _ in range(resamples):
        picks = generator.integers(0, len(dataset), len(dataset))
        records = [replace(dataset.records[i], image_id=position + 1) for position, i in enumerate(picks)]
        draw = DetectionDataset(list(dataset.classes), records)
        deltas.append(coco_evaluate(draw, [first[i] for i in picks])["AP"] -
                      coco_evaluate(draw, [second[i] for i in picks])["AP"])
    deltas = np.asarray(deltas)
    tail = (1.0 - level) / 2
    return {"delta": coco_evaluate(dataset, first)["AP"] - coco_evaluate(dataset, second)["AP"],
            "mean": float(deltas.mean()), "low": float(np.quantile(deltas, tail)),
            "high": float(np.quantile(deltas, 1.0 - tail)), "positive": float((deltas > 0).mean()),
            "resamples": resamples, "level": level}
