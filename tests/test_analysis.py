"""Tracing and structural layer typing on timm, torchvision and hand-written ViTs."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.fx as fx
import torchvision
from torch import nn

import lampq_fx as lq
from lampq_fx.analysis import META_KEY, LayerType, TracingError, annotate_layers, trace_model

BLOCK = ["qkv", "attn_qk", "attn_v", "proj", "fc1", "fc2"]


def _types(graph_module: fx.GraphModule) -> list[str]:
    return [info.layer_type.value for info in lq.layers_of(graph_module)]


def _timm(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def test_deit_types_and_names():
    model = _timm("deit_small_patch16_224", depth=2)
    graph_module = lq.trace(model, torch.randn(1, 3, 224, 224))
    assert _types(graph_module) == ["patch_embed", *BLOCK, *BLOCK, "head"]
    names = [info.name for info in lq.layers_of(graph_module)]
    assert names[:4] == ["patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.attn_qk", "blocks.0.attn.attn_v"]


def test_dinov2_layerscale_types():
    model = _timm("vit_small_patch14_dinov2", depth=2, img_size=56)
    graph_module = lq.trace(model, torch.randn(1, 3, 56, 56))
    # The DINOv2 backbone has no classifier: the last fc2 feeds the output through the norm.
    assert _types(graph_module) == ["patch_embed", *BLOCK, *BLOCK]


def test_swin_types_include_patch_merging():
    model = _timm("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1))
    graph_module = lq.trace(model, torch.randn(1, 3, 224, 224))
    types = _types(graph_module)
    assert types[0] == "patch_embed"
    assert types[-1] == "head"
    assert types.count("other") == 3  # one patch-merging reduction per downsampling stage
    for layer_type in BLOCK:
        assert types.count(layer_type) == 4
    reductions = [i.name for i in lq.layers_of(graph_module) if i.layer_type is LayerType.OTHER]
    assert all(name.endswith("downsample.reduction") for name in reductions)


def test_torchvision_vit_mha_is_qkv():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16().eval()
    model.encoder.layers = model.encoder.layers[:2]
    graph_module = lq.trace(model, torch.randn(1, 3, 224, 224))
    assert _types(graph_module) == ["patch_embed", *BLOCK, *BLOCK, "head"]
    fused = lq.layers_of(graph_module)[1]
    assert fused.name == "encoder.layers.encoder_layer_0.self_attention.in_proj"
    assert fused.weight_params == 3 * 768 * 768


@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_encoder_layer_traced(norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=norm_first, activation="gelu")
    model = nn.Sequential(nn.Linear(6, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.Linear(16, 3)).eval()
    x = torch.randn(4, 5, 6)
    graph_module = lq.trace(model, x)
    assert _types(graph_module) == ["patch_embed", *BLOCK, *BLOCK, "head"]
    with torch.no_grad():
        torch.testing.assert_close(graph_module(x), model(x), rtol=1e-5, atol=1e-5)


def test_renamed_modules_same_types(tiny_vit):
    x = torch.randn(2, 1, 8, 8)
    graph_module = lq.trace(tiny_vit, x)
    assert _types(graph_module) == ["patch_embed", *BLOCK, *BLOCK, "head"]
    assert all(info.typed_by == "structure" for info in lq.layers_of(graph_module))

    # Rename every module of a traced timm ViT and re-type: the types must not change.
    model = _timm("vit_tiny_patch16_224", depth=2, img_size=32)
    example = torch.randn(1, 3, 32, 32)
    original = trace_model(model, example)
    expected = [info.layer_type for info in annotate_layers(original, example)]
    renamed = trace_model(model, example)
    for index, node in enumerate(n for n in renamed.graph.nodes if n.op == "call_module"):
        module = renamed.get_submodule(node.target)
        renamed.add_submodule(f"m{index}", module)
        node.target = f"m{index}"
    renamed.recompile()
    for node in renamed.graph.nodes:
        node.meta.pop(META_KEY, None)
        node.meta.pop("nn_module_stack", None)
    assert [info.layer_type for info in annotate_layers(renamed, example)] == expected


@pytest.mark.parametrize("name,kwargs,size", [
    ("deit_small_patch16_224", {"depth": 2}, 224),
    ("vit_small_patch14_dinov2", {"depth": 2, "img_size": 56}, 56),
    ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1)}, 224),
])
def test_traced_equals_eager_any_batch(name, kwargs, size):
    model = _timm(name, **kwargs)
    graph_module = trace_model(model, torch.randn(1, 3, size, size))
    for batch in (1, 3):
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(graph_module(x), model(x), rtol=1e-5, atol=1e-5)


def test_tiny_vit_any_batch(tiny_vit):
    graph_module = lq.trace(tiny_vit, torch.randn(1, 1, 8, 8))
    for batch in (1, 2, 7):
        x = torch.randn(batch, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(graph_module(x), tiny_vit(x))


def test_layer_info_macs_and_post_norm(tiny_vit):
    graph_module = lq.trace(tiny_vit, torch.randn(1, 1, 8, 8))
    layers = {info.name: info for info in lq.layers_of(graph_module)}
    # 5 tokens (4 patches + class token), width 16: qkv MACs = 5 · 16 · 48.
    assert layers["blocks.0.mix"].macs == 5 * 16 * 48
    assert layers["blocks.0.mix"].post_norm_input
    assert not layers["blocks.0.down"].post_norm_input
    # q·kᵀ per head: [5, 8] @ [8, 5] for 2 heads.
    assert layers["attn_qk"].macs == 2 * 5 * 5 * 8
    assert "attn_qk_2" in layers  # matmuls of the root module get numbered names
    assert layers["alpha"].macs == 4 * 16 * 16


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Branchy()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.inner(x))


def test_untraceable_error_names_module():
    with pytest.raises(TracingError) as raised:
        trace_model(Wrapper(), torch.randn(2, 4))
    message = str(raised.value)
    assert "module 'inner'" in message
    assert "Branchy" in message
    assert "leaf_modules=[Branchy]" in message
    assert "concrete_args" in message


def test_leaf_module_workaround():
    model = Wrapper().eval()
    graph_module = lq.trace(model, torch.randn(2, 4), leaf_modules=[Branchy])
    assert [info.name for info in lq.layers_of(graph_module)] == ["head"]
