"""The ViT-FCOS detector: tracing, layer types, shared head, and the per-sample detection Fisher."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from lampq_fx.detection.model import ViTFCOS, detection_loss  # noqa: E402
from lampq_fx.session import CalibrationSet, LampQSession  # noqa: E402

SIZE = (32, 48)


def _detector():
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=SIZE, patch_size=4, embed_dim=32, depth=2,
                                                           num_heads=2, num_classes=0)
    return ViTFCOS(vit, num_classes=2, image_size=SIZE, channels=32).eval()


def _targets(count):
    targets = []
    for index in range(count):
        shift = 2.0 * index
        targets.append({"boxes": torch.tensor([[4 + shift, 4, 14 + shift, 12], [20, 10 + shift, 40, 30 + shift]]),
                        "labels": torch.tensor([index % 2, 1])})
    targets[-1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}  # an empty image
    return targets


@pytest.fixture(scope="module")
def detection_session():
    model = _detector()
    images = torch.randn(4, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    session = LampQSession(model, CalibrationSet(images, _targets(4)), loss_fn=detection_loss(model), batch_size=2,
                           progress=False)
    session.calibrate()
    return model, session


def test_detector_outputs_and_decoding():
    model = _detector()
    outputs = model(torch.randn(2, 3, *SIZE))
    positions = sum(model.num_anchors_per_level)
    assert outputs["cls_logits"].shape == (2, positions, 2)
    assert outputs["bbox_regression"].shape == (2, positions, 4)
    losses = model.per_sample_loss(outputs, _targets(2))
    assert losses.shape == (2,)
    assert torch.isfinite(losses).all()
    detections = model.decode(outputs)
    assert len(detections) == 2
    assert detections[0]["boxes"].shape[1] == 4
    with pytest.raises(ValueError, match="multiple of twice the patch size"):
        ViTFCOS(timm.models.vision_transformer.VisionTransformer(img_size=(36, 48), patch_size=4, embed_dim=32,
                                                                 depth=1, num_heads=2, num_classes=0),
                num_classes=2, image_size=(36, 48))


def test_detector_layers_get_types(detection_session):
    _, session = detection_session
    counts = {}
    for layer in session.layers:
        counts[layer.layer_type.value] = counts.get(layer.layer_type.value, 0) + 1
    assert counts == {"patch_embed": 1, "qkv": 2, "attn_qk": 2, "attn_v": 2, "proj": 2, "fc1": 2, "fc2": 2,
                      "other": 10, "head": 3}
    head = {layer.name: layer for layer in session.layers if layer.layer_type.value == "head"}
    assert set(head) == {"core.head.classification_head.cls_logits", "core.head.regression_head.bbox_reg",
                         "core.head.regression_head.bbox_ctrness"}
    assert all(layer.calls == 3 for layer in head.values())  # one head serves the three pyramid levels


@pytest.mark.parametrize("name", ["core.head.classification_head.cls_logits", "core.head.regression_head.conv.0",
                                  "core.backbone.body.vit.blocks.1.mlp.fc1", "core.backbone.pyramid.lateral.1"])
def test_detection_fisher_matches_brute_force(detection_session, name):
    model, session = detection_session
    traces = session.fisher()
    module = session.modules[name]
    images, targets = session.calibration.images, session.calibration.labels
    total = 0.0
    for index in range(len(images)):
        loss = session.loss_fn(session.graph_module(images[index:index + 1]), [targets[index]]).sum()
        (gradient,) = torch.autograd.grad(loss, module.weight)
        total += float(gradient.pow(2).sum())
    expected = total / len(images)
    assert traces[name].weight == pytest.approx(expected, rel=1e-4)


def test_head_training_lowers_loss():
    from lampq_fx.detection.bccd import _flip, train_head
    model = _detector()
    images = torch.randn(6, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    targets = _targets(6)
    with torch.no_grad():
        maps = model.core.backbone.body(images)
    twice, back = _flip(*_flip(maps, targets, True, True, SIZE), True, True, SIZE)
    assert torch.equal(twice, maps)
    assert all(torch.allclose(a["boxes"], b["boxes"]) for a, b in zip(back, targets))
    history = train_head(model, maps, targets, epochs=8, lr=5e-3, batch_size=3, seed=0)
    assert history[-1] < 0.8 * history[0]
    body = dict(model.core.backbone.body.named_parameters())
    fresh = dict(_detector().core.backbone.body.named_parameters())
    assert all(torch.equal(body[name], fresh[name]) for name in body)  # the backbone stays frozen


def test_detection_task_errors(tmp_path, caplog):
    from lampq_fx.cli import main
    assert main(["quantize", "--task", "detection", "--out", str(tmp_path / "a")]) == 2
    assert "--task detection needs --data" in caplog.text
    assert main(["quantize", "--task", "detection", "--data", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "is not a Pascal VOC folder" in caplog.text


def test_synthetic_calibration_for_a_detector(tmp_path):
    from lampq_fx.zeroshot import SyntheticConfig, replace_calibration
    model = _detector()
    calibration = CalibrationSet(torch.zeros(4, 3, *SIZE), _targets(4))
    config = SyntheticConfig(steps=3, batch_size=4, pairs=32, seed=2)
    with pytest.raises(ValueError, match="needs targets for this model's loss"):
        replace_calibration(model, calibration, "synthetic", config, progress=False)

    def pseudo_targets(images):  # every detection, so the tiny untrained detector yields boxes
        return [{"boxes": d["boxes"], "labels": d["labels"]} for d in model.decode(model(images))]

    import lampq_fx.zeroshot as zeroshot
    original = zeroshot.synthetic_images
    zeroshot.synthetic_images = lambda *a, **k: original(*a, **{**k, "cache_dir": tmp_path})
    try:
        synthetic, facts = replace_calibration(model, calibration, "synthetic", config, progress=False,
                                               pseudo_targets=pseudo_targets)
    finally:
        zeroshot.synthetic_images = original
    assert facts["mode"] == "synthetic"
    assert facts["images"] == 4
    assert synthetic.images.shape == calibration.images.shape
    assert not torch.equal(synthetic.images, calibration.images)
    assert len(synthetic.labels) == 4 and all(t["boxes"].shape[-1] == 4 for t in synthetic.labels)
    # The detector's own loss scores the synthetic set: the Fisher is finite and not all zero.
    session = LampQSession(model, synthetic, loss_fn=detection_loss(model), batch_size=2, progress=False)
    session.calibrate()
    traces = session.fisher()
    values = torch.tensor([trace.weight for trace in traces.values()])
    assert torch.isfinite(values).all()
    assert values.sum() > 0
