"""Fisher traces against a brute-force per-sample oracle, and non-finite guards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lampq_fx as lq
from lampq_fx.metrics.fisher import NonFiniteError, classification_loss, compute_fisher_traces
from lampq_fx.quantize.prepare import quant_modules


def _prepared(tiny_vit):
    torch.manual_seed(0)
    images = torch.randn(6, 1, 8, 8)
    labels = torch.randint(0, 5, (6,))
    session = lq.LampQSession(tiny_vit, lq.CalibrationSet(images, labels), batch_size=4, progress=False)
    session.calibrate()
    return session, images, labels


def _brute_force(session, images, labels):
    """Sum of squared per-sample gradients, one backward pass per sample."""
    graph_module = session.graph_module
    modules = quant_modules(graph_module)
    weight = {name: 0.0 for name in modules}
    inputs = {name: [0.0] * len(m.input_quantizers) for name, m in modules.items()}
    for index in range(len(images)):
        captured = {}
        handles = []
        for name, module in modules.items():
            for position, quantizer in enumerate(module.input_quantizers):
                def keep(_module, _args, output, name=name, position=position):
                    output.retain_grad()
                    captured[(name, position)] = output
                handles.append(quantizer.register_forward_hook(keep))
        graph_module.zero_grad()
        image = images[index:index + 1].clone().requires_grad_(True)
        loss = F.cross_entropy(graph_module(image), labels[index:index + 1])
        loss.backward()
        for handle in handles:
            handle.remove()
        for name, module in modules.items():
            if module.has_weight:
                weight[name] += float(module.weight.grad.pow(2).sum())
            for position in range(len(module.input_quantizers)):
                inputs[name][position] += float(captured[(name, position)].grad.pow(2).sum())
    count = len(images)
    return ({n: v / count for n, v in weight.items()},
            {n: [v / count for v in values] for n, values in inputs.items()})


@pytest.mark.parametrize("quantized", [False, True])
def test_fisher_matches_per_sample_oracle(tiny_vit, quantized):
    session, images, labels = _prepared(tiny_vit)
    bits = {layer.name: (4 if layer.has_weight else None, 6) for layer in session.layers} if quantized else None
    traces = session.fisher(bits)
    session.apply(bits)
    expected_weight, expected_inputs = _brute_force(session, images, labels)
    session.apply(None)
    for name, trace in traces.items():
        assert trace.weight == pytest.approx(expected_weight[name], rel=1e-4, abs=1e-12), name
        assert trace.inputs == pytest.approx(expected_inputs[name], rel=1e-4, abs=1e-12), name
    assert any(t.weight > 0 for t in traces.values())
    assert traces["attn_qk"].weight == 0.0
    assert len(traces["attn_v"].inputs) == 2


def test_gram_and_direct_forms_agree():
    from lampq_fx.metrics.fisher import per_sample_squared_norms
    torch.manual_seed(0)
    for tokens in (2, 40):  # few tokens take the Gram form, many take the direct form
        x, g = torch.randn(3, tokens, 6), torch.randn(3, tokens, 5)
        direct = torch.einsum("bto,bti->boi", g, x).pow(2).sum(dim=(1, 2))
        torch.testing.assert_close(per_sample_squared_norms(x, g), direct, rtol=1e-4, atol=1e-5)


def test_nan_loss_names_batch(tiny_vit):
    session, images, labels = _prepared(tiny_vit)
    poisoned = images.clone()
    poisoned[5] = float("nan")  # batch size 4: the second batch
    batches = [(poisoned[:4], labels[:4]), (poisoned[4:], labels[4:])]
    with pytest.raises(NonFiniteError, match="calibration batch 1"):
        compute_fisher_traces(session.graph_module, batches, classification_loss, progress=False)


class _NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def test_nan_gradient_names_layer(tiny_vit):
    session, images, labels = _prepared(tiny_vit)
    modules = quant_modules(session.graph_module)
    head = modules["omega"]
    head.register_forward_pre_hook(lambda _m, args: (_NanGradient.apply(args[0]),))
    with pytest.raises(NonFiniteError) as raised:
        compute_fisher_traces(session.graph_module, [(images[:4], labels[:4])], classification_loss,
                              progress=False)
    message = str(raised.value)
    assert "calibration batch 0" in message
    assert "layer '" in message
    assert "'omega'" not in message  # the head's own gradients are finite; its inputs' are not
