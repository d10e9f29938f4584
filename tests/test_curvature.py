"""Curvature against brute force: the last-layer GGN is the autograd Hessian, quadratic forms are
explicit solves, EK-FAC is exact where the GGN is a Kronecker product and close to the explicit
whole-network GGN elsewhere, and nothing depends on batch size or sample order."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import head_gradients
from scipy.stats import spearmanr
from torch import nn
from torch.func import functional_call, jacrev, vmap

from engine.curvature import EKFAC, LastLayerCurvature, last_layer_ggn
from engine.task import ImageTask

TASK = ImageTask((0.3,), (0.3,))


def _images(n=60, classes=3, seed=0, size=6):
    """Class c brightens rows 2c, 2c+1 (learnable), plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 80, (n, size, size))
    for i, c in enumerate(labels):
        images[i, 2 * c:2 * c + 2] += 150
    return images.astype(np.uint8), labels


def _explicit_scores(hessian, gradients, damping):
    system = hessian + damping * torch.eye(len(hessian), dtype=hessian.dtype)
    return (gradients * torch.linalg.solve(system, gradients.T).T).sum(1)


@pytest.mark.parametrize("bias", [True, False])
def test_last_layer_ggn_is_the_autograd_hessian_of_the_mean_loss(bias):
    torch.manual_seed(0)
    m, d, c = 25, 4, 3
    features, labels = torch.randn(m, d, dtype=torch.float64), torch.randint(0, c, (m,))
    columns = d + bias

    def mean_loss(theta):
        w = theta.reshape(c, columns)
        logits = features @ w[:, :d].T + (w[:, d] if bias else 0)
        return F.cross_entropy(logits, labels)

    theta = torch.randn(c * columns, dtype=torch.float64)
    hessian = torch.autograd.functional.hessian(mean_loss, theta)
    w = theta.reshape(c, columns)
    probs = torch.softmax(features @ w[:, :d].T + (w[:, d] if bias else 0), 1)
    torch.testing.assert_close(last_layer_ggn(features, probs, bias=bias), hessian, rtol=1e-10, atol=1e-12)


def test_head_gradients_are_autograd_gradients_in_head_parameter_order():
    torch.manual_seed(1)
    head = nn.Linear(4, 3).double()
    features, labels = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    probs = torch.softmax(head(features), 1).detach()
    for i in range(5):
        w, b = torch.autograd.grad(F.cross_entropy(head(features[i:i + 1]), labels[i:i + 1]), [head.weight, head.bias])
        torch.testing.assert_close(head_gradients(features, probs, labels)[i], torch.cat([w, b[:, None]], 1).flatten())


def test_quadratic_forms_and_candidates_equal_an_explicit_solve():
    torch.manual_seed(2)
    features, logits = torch.randn(40, 5, dtype=torch.float64), 2 * torch.randn(40, 4, dtype=torch.float64)
    probs = torch.softmax(logits, 1)
    labels = torch.randint(0, 4, (40,))
    curvature = LastLayerCurvature.fit(features, probs)
    hessian = last_layer_ggn(features, probs)
    assert curvature.damping == pytest.approx(0.1 * hessian.trace().item() / len(hessian))
    explicit = _explicit_scores(hessian, head_gradients(features, probs, labels), curvature.damping)
    torch.testing.assert_close(curvature.quadratic_form(head_gradients(features, probs, labels)), explicit)
    candidates = curvature.candidate_scores(features, probs)
    for c in range(4):
        column = _explicit_scores(hessian, head_gradients(features, probs, torch.full((40,), c)), curvature.damping)
        np.testing.assert_allclose(candidates[:, c], column.numpy(), rtol=1e-9)


def _linear_model(zero_weights: bool) -> nn.Module:
    torch.manual_seed(3)
    linear = nn.Linear(36, 3).double()
    if zero_weights:
        with torch.no_grad():
            linear.weight.zero_()
    return nn.Sequential(nn.Flatten(), linear)


def _linear_reference(model, images, labels):
    x = TASK.inputs(images).double().flatten(1)
    probs = torch.softmax(model(x), 1).detach()
    curvature = LastLayerCurvature.fit(x, probs)
    return curvature.quadratic_form(head_gradients(x, probs, labels)).numpy(), curvature.candidate_scores(x, probs)


def test_ekfac_is_exact_for_a_one_layer_model_whose_ggn_is_a_kronecker_product():
    """With zero weights every sample has the same softmax p, so the GGN is exactly
    (diag p − ppᵀ) ⊗ E[â âᵀ]: the Kronecker eigenbasis diagonalizes it, the corrected eigenvalues
    are its eigenvalues, and the mean eigenvalue (so the default damping) is the same trace/dim."""
    images, labels = _images()
    model = _linear_model(zero_weights=True)
    ekfac = EKFAC.fit(model, TASK, images, "cpu", batch_size=16)
    scores, candidates = _linear_reference(model, images, labels)
    np.testing.assert_allclose(ekfac.scores(TASK, images, labels, "cpu"), scores, rtol=1e-8)
    np.testing.assert_allclose(ekfac.scores(TASK, images, None, "cpu"), candidates, rtol=1e-8)


def test_ekfac_is_only_an_approximation_once_the_samples_differ():
    """The control for the exact case: trained weights make p vary per sample, the GGN is no
    longer a Kronecker product, and EK-FAC departs from it (so the test above can fail)."""
    images, labels = _images()
    model = _linear_model(zero_weights=False)
    scores, _ = _linear_reference(model, images, labels)
    ekfac_scores = EKFAC.fit(model, TASK, images, "cpu").scores(TASK, images, labels, "cpu")
    assert not np.allclose(ekfac_scores, scores, rtol=1e-2)


def _tiny_cnn() -> nn.Module:
    """Conv-BN-ReLU, conv, pooling, linear; trained briefly on noisy labels so p varies."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(24, 3)).double()


def test_ekfac_ranks_like_the_explicit_whole_network_ggn_on_a_small_cnn():
    images, labels = _images(n=120)
    rng = np.random.default_rng(1)
    flipped = rng.choice(len(labels), 12, replace=False)
    labels[flipped] = (labels[flipped] + 1) % 3
    model = _tiny_cnn()
    x, y = TASK.inputs(images).double(), torch.as_tensor(labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    for p in model[1].parameters():  # BatchNorm: eval mode, frozen (EK-FAC covers Linear/Conv2d)
        p.requires_grad_(False)

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    jac = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi[None],))[0]), in_dims=(None, 0))(params, x)
    jac = torch.cat([jac[k].reshape(len(x), 3, -1) for k in params], 2)            # (N, C, P)
    probs = torch.softmax(model(x), 1).detach()
    output_hessian = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    ggn = torch.einsum("ncp,ncd,ndq->pq", jac, output_hessian, jac) / len(x)
    gradients = torch.einsum("ncp,nc->np", jac, probs - F.one_hot(y, 3))
    explicit = _explicit_scores(ggn, gradients, 0.1 * ggn.trace() / len(ggn)).numpy()

    ekfac = EKFAC.fit(model, TASK, images, "cpu")
    assert ekfac.names == ["0", "3", "7"]
    assert spearmanr(ekfac.scores(TASK, images, labels, "cpu"), explicit)[0] >= 0.9
    sampled = EKFAC.fit(model, TASK, images, "cpu", fisher="sampled")
    assert spearmanr(sampled.scores(TASK, images, labels, "cpu"), explicit)[0] >= 0.9


@pytest.mark.parametrize("fisher", ["exact", "sampled"])
def test_ekfac_does_not_depend_on_batch_size_or_sample_order(fisher):
    """Sampled Fisher labels are keyed by sample id, so they too follow the rows."""
    images, labels = _images(n=50)
    ids = np.arange(100, 150)
    model = _tiny_cnn().eval()
    reference = EKFAC.fit(model, TASK, images, "cpu", batch_size=64, fisher=fisher, sample_ids=ids).scores(
        TASK, images, labels, "cpu")
    order = np.random.default_rng(0).permutation(len(labels))
    ekfac = EKFAC.fit(model, TASK, images[order], "cpu", batch_size=7, fisher=fisher, sample_ids=ids[order])
    np.testing.assert_allclose(ekfac.scores(TASK, images[order], labels[order], "cpu", batch_size=11),
                               reference[order], rtol=1e-8)


# ---- EK-FAC of the head (ekfac-last) ------------------------------------------------------------

def _head_setup(m=40, d=5, c=4, seed=0, same_probabilities=False):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(m, d, generator=g, dtype=torch.float64)
    logits = torch.randn(1 if same_probabilities else m, c, generator=g, dtype=torch.float64).expand(m, c)
    return features, torch.softmax(logits, 1)


def test_head_ekfac_equals_the_exact_head_ggn_where_it_is_a_kronecker_product():
    # Every sample with the same p: the GGN is (diag p − ppᵀ) ⊗ E[ââᵀ] exactly, so EK-FAC's basis
    # diagonalizes it, its damping (mean eigenvalue = trace / dim) is the same, and so is every score.
    from engine.curvature import HeadEKFAC
    features, probs = _head_setup(same_probabilities=True)
    exact = LastLayerCurvature.fit(features, probs, relative_damping=0.1)
    ekfac = HeadEKFAC.fit(features, probs, relative_damping=0.1)
    assert ekfac.damping == pytest.approx(exact.damping, rel=1e-10)
    others, other_probs = _head_setup(m=12, seed=1)
    np.testing.assert_allclose(ekfac.candidate_scores(others, other_probs),
                               exact.candidate_scores(others, other_probs), rtol=1e-8)


def test_head_ekfac_scores_are_the_explicit_kronecker_eigenbasis_solve_and_track_the_exact_ones():
    from engine.curvature import HeadEKFAC
    features, probs = _head_setup(m=200, d=6, c=5, seed=2)
    ekfac = HeadEKFAC.fit(features, probs, relative_damping=0.1)
    # Brute force: the EK-FAC matrix (Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ built explicitly, with Λ the
    # diagonal of the explicit GGN in that basis.
    ggn = last_layer_ggn(features, probs)
    basis = torch.kron(ekfac.q_s, ekfac.q_a)
    eigenvalues = torch.diagonal(basis.T @ ggn @ basis)
    torch.testing.assert_close(ekfac.eigenvalues.flatten(), eigenvalues, rtol=1e-9, atol=1e-12)
    explicit = basis @ torch.diag(eigenvalues) @ basis.T
    labels = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(3))
    grads = head_gradients(features, probs, labels)
    expected = _explicit_scores(explicit, grads, ekfac.damping)
    got = ekfac.candidate_scores(features, probs)[np.arange(200), labels.numpy()]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-8)
    exact = LastLayerCurvature.fit(features, probs, relative_damping=0.1).candidate_scores(features, probs)
    assert spearmanr(got, exact[np.arange(200), labels.numpy()]).statistic > 0.95


def test_a_head_too_large_for_the_exact_ggn_switches_to_ekfac_and_says_so(monkeypatch):
    import engine.curvature as curvature
    model = nn.Module()
    model.head = nn.Linear(512, 100)  # CIFAR-100 on a ResNet-18: (51,300)² numbers, ~21 GB
    kind, note = curvature.head_curvature_kind(model)
    assert kind == "ekfac-last" and "51,300" in note and "EK-FAC" in note
    model.head = nn.Linear(64, 10)
    assert curvature.head_curvature_kind(model) == ("last", None)
    assert curvature.head_curvature_kind(model, "ekfac-last") == ("ekfac-last", None)
