"""Per-sample gradient quantities from one batched pass equal a loop of single-sample backward passes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InfluenceLensError
from engine.models import SmallCNN
from engine.per_sample import TIE_ORDER, LayerCapture, per_sample_grad_sq_norms, trainable_layers
from engine.task import ImageTask

PATHS = ("ghost-factors", "explicit-factors")  # the variants that apply to every Linear and Conv2d
CONV_PATHS = PATHS + ("ghost-pixels", "explicit-conv")


def _randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so BatchNorm is really tested."""
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=generator) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=generator) - 0.5)
    return model


def brute_force_sq_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         params: list[nn.Parameter]) -> torch.Tensor:
    """Σ over ``params`` of the squared gradient, one backward pass per sample."""
    out = []
    for i in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum"), params)
        out.append(sum(g.square().sum() for g in grads))
    return torch.stack(out)


def _captured(model, x, y, layer, path):
    with LayerCapture(model, [layer], norm_method=path) as cap:
        x = x.clone().requires_grad_(True)
        F.cross_entropy(model(x), y, reduction="sum").backward()
        return cap.per_sample_sq_norm(layer), cap.variant(layer)


CONVS = {
    "bias": dict(kernel_size=3),
    "no-bias": dict(kernel_size=3, bias=False),
    "stride-padding": dict(kernel_size=3, stride=2, padding=1),
    "rect-dilation": dict(kernel_size=(3, 2), dilation=2, padding=(2, 1), bias=False),
    "same-reflect": dict(kernel_size=3, padding="same", padding_mode="reflect"),
}


@pytest.mark.parametrize("path", CONV_PATHS)
@pytest.mark.parametrize("case", CONVS)
def test_conv2d_norms_matchbrute_force_sq_norms(case, path):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, **CONVS[case])
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(4)).double()
    x = torch.randn(6, 3, 9, 9, dtype=torch.float64)
    model(x)  # materialize the lazy head
    y = torch.randint(0, 4, (6,))
    norms, used = _captured(model, x, y, conv, path)
    assert used == path
    torch.testing.assert_close(norms, brute_force_sq_norms(model, x, y, list(conv.parameters())), rtol=1e-4, atol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens", [None, 4])
def test_linear_norms_matchbrute_force_sq_norms(tokens, bias, path):
    torch.manual_seed(0)
    linear = nn.Linear(7, 6, bias=bias)
    model = nn.Sequential(linear, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()
    x = torch.randn(5, 7, dtype=torch.float64) if tokens is None else torch.randn(5, tokens, 7, dtype=torch.float64)
    model(x)
    y = torch.randint(0, 3, (5,))
    norms, _ = _captured(model, x, y, linear, path)
    torch.testing.assert_close(norms, brute_force_sq_norms(model, x, y, list(linear.parameters())), rtol=1e-4, atol=0)


def test_batchnorm_eval_norms_and_grads_matchbrute_force_sq_norms():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    model = _randomize_batchnorm(nn.Sequential(nn.Conv2d(2, 4, 3), bn, nn.ReLU(inplace=True), nn.Flatten(),
                                               nn.LazyLinear(3)).double()).eval()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    model(x)
    y = torch.randint(0, 3, (5,))
    norms, _ = _captured(model, x, y, bn, "auto")
    torch.testing.assert_close(norms, brute_force_sq_norms(model, x, y, [bn.weight, bn.bias]), rtol=1e-4, atol=0)
    with LayerCapture(model, [bn]) as cap:
        F.cross_entropy(model(x.clone().requires_grad_(True)), y, reduction="sum").backward()
        grads = cap.per_sample_grads(bn)
        with pytest.raises(TypeError, match="per-channel"):
            cap.factors(bn)
    expected = torch.autograd.grad(F.cross_entropy(model(x[2:3]), y[2:3], reduction="sum"), [bn.weight, bn.bias])
    torch.testing.assert_close(grads["weight"][2], expected[0])
    torch.testing.assert_close(grads["bias"][2], expected[1])


@pytest.mark.parametrize("path", CONV_PATHS + ("auto", "ghost", "explicit"))
def test_small_cnn_total_norm_matchesbrute_force_sq_norms(path):
    torch.manual_seed(0)
    model = _randomize_batchnorm(SmallCNN(3, 10, image_size=16, width=8).double()).eval()
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    with LayerCapture(model, norm_method=path) as cap:
        x_grad = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(x_grad), y, reduction="sum"), x_grad)
        norms = cap.total_sq_norm()
    torch.testing.assert_close(norms, brute_force_sq_norms(model, x, y, list(model.parameters())), rtol=1e-4, atol=0)


def test_auto_picks_the_fewest_operations_without_a_clock(monkeypatch):
    """Issue 13: a choice by run-time timing made two runs of one command differ by 7e-5; the rule
    (fewest multiply-adds, ties by TIE_ORDER) gives the same variant every time, and reads no clock."""
    import time

    def no_clock():
        raise AssertionError("the variant choice must not depend on timing")

    model = SmallCNN(3, 10, image_size=32).eval()
    with LayerCapture(model) as cap:
        x = torch.randn(2, 3, 32, 32, requires_grad=True)
        torch.autograd.grad(model(x).sum(), x)
        monkeypatch.setattr(time, "perf_counter", no_clock)
        first_conv = model.body[0]
        # 1024 output pixels, 27 inputs, 32 outputs: a ghost Gram costs ~50× the explicit gradient.
        costs = cap._costs(first_conv)
        assert costs["explicit-conv"] == costs["explicit-factors"] < costs["ghost-factors"] / 10
        assert cap.variant(first_conv) == "explicit-conv"  # the tie goes to the kernel without unfolded patches
        assert cap.variant(model.head) == "ghost-factors"  # one position: ‖a‖²‖b‖²
        for layer in (layer for layer in cap.layers if not isinstance(layer, nn.BatchNorm2d)):
            costs = cap._costs(layer)
            assert cap.variant(layer) == min(costs, key=lambda v: (costs[v], TIE_ORDER.index(v)))


def test_factors_and_per_sample_grads_of_a_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(4, 2, 7, 7, dtype=torch.float64)
    model(x)
    y = torch.randint(0, 2, (4,))
    with LayerCapture(model, [conv]) as cap:
        F.cross_entropy(model(x), y, reduction="sum").backward()
        a, b = cap.factors(conv)
        grads = cap.per_sample_grads(conv)
    assert a.shape == (4, 16, 2 * 9 + 1) and b.shape == (4, 16, 3)
    assert torch.all(a[:, :, -1] == 1)
    expected = torch.autograd.grad(F.cross_entropy(model(x[1:2]), y[1:2], reduction="sum"), [conv.weight, conv.bias])
    torch.testing.assert_close(grads["weight"][1], expected[0])
    torch.testing.assert_close(grads["bias"][1], expected[1])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_shared_layer_sums_its_calls(kind):
    torch.manual_seed(0)
    shared = nn.Linear(5, 5) if kind == "linear" else nn.Conv2d(2, 2, 3, padding=1)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.head = shared, nn.LazyLinear(3)

        def forward(self, x):
            return self.head(self.shared(torch.tanh(self.shared(x))).flatten(1))

    model = Twice().double()
    x = torch.randn(4, 5, dtype=torch.float64) if kind == "linear" else torch.randn(4, 2, 5, 5, dtype=torch.float64)
    model(x)
    y = torch.randint(0, 3, (4,))
    for path in PATHS if kind == "linear" else CONV_PATHS:
        norms, _ = _captured(model, x, y, shared, path)
        expected = brute_force_sq_norms(model, x, y, list(shared.parameters()))
        torch.testing.assert_close(norms, expected, rtol=1e-6, atol=0)


def _digit_like(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), rng.integers(0, 10, n)


def test_per_sample_grad_sq_norms_float32_matches_brute_force_and_is_batch_and_order_invariant():
    torch.manual_seed(0)
    images, labels = _digit_like()
    task = ImageTask(mean=(0.3,), std=(0.2,))
    model = _randomize_batchnorm(SmallCNN(1, 10, image_size=8, width=8)).eval()
    norms = per_sample_grad_sq_norms(model, task, images, labels, "cpu", batch_size=16)
    assert norms.dtype == np.float64 and norms.shape == (40,)
    x = task.inputs(images).double()
    brute = brute_force_sq_norms(model.double(), x, torch.as_tensor(labels), list(model.parameters())).numpy()
    model.float()
    np.testing.assert_allclose(norms, brute, rtol=1e-4)
    np.testing.assert_allclose(per_sample_grad_sq_norms(model, task, images, labels, "cpu", batch_size=7),
                               norms, rtol=1e-5)
    perm = np.random.default_rng(1).permutation(40)
    np.testing.assert_allclose(per_sample_grad_sq_norms(model, task, images[perm], labels[perm], "cpu"),
                               norms[perm], rtol=1e-5)


def test_chunked_norms_equal_unchunked():
    torch.manual_seed(0)
    images, labels = _digit_like(12)
    task = ImageTask(mean=(0.3,), std=(0.2,))
    model = SmallCNN(1, 10, image_size=8, width=8).eval()
    whole = per_sample_grad_sq_norms(model, task, images, labels, "cpu")
    with LayerCapture(model, chunk_elements=1) as cap:  # one row per chunk
        x = task.inputs(images).requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(x), torch.as_tensor(labels), reduction="sum"), x)
        np.testing.assert_allclose(cap.total_sq_norm().double().numpy(), whole, rtol=1e-5)


def test_model_mode_is_restored_and_batchnorm_in_training_mode_is_refused():
    images, labels = _digit_like(4)
    task = ImageTask(mean=(0.3,), std=(0.2,))
    model = SmallCNN(1, 10, image_size=8, width=4).train()
    per_sample_grad_sq_norms(model, task, images, labels, "cpu")
    assert model.training
    with LayerCapture(model), pytest.raises(InfluenceLensError, match="eval mode"):
        model(task.inputs(images))


def test_unsupported_layers_are_refused_clearly():
    with pytest.raises(InfluenceLensError, match="LayerNorm"):
        trainable_layers(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)))
    with pytest.raises(InfluenceLensError, match="groups=2"):
        LayerCapture(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)))
    frozen = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    frozen[1].requires_grad_(False)
    assert trainable_layers(frozen) == [frozen[0]]
    with pytest.raises(ValueError, match="norm_method"):
        LayerCapture(frozen, norm_method="fast")
