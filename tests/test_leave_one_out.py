"""Influence functions against actual leave-one-out retraining on a convex model.

Multinomial logistic regression with L2 weight μ, R(θ) = (1/N) Σ ℓ_i(θ) + (μ/2)‖θ‖²: its Hessian
is the last-layer GGN plus μI, so the engine's damped head curvature with λ = μ is exact.
Removing sample j (weight 1/N → 0) moves the optimum by ≈ (1/N)(H + μI)⁻¹ g_j, and the validation
loss by ≈ (1/N) ∇L_valᵀ(H + μI)⁻¹ g_j (Koh & Liang 2017). Retraining without j, from θ*, to
convergence gives the truth.
"""

import numpy as np
import torch
import torch.nn.functional as F
from conftest import head_gradients
from scipy.stats import pearsonr

from engine.curvature import LastLayerCurvature

MU = 1e-2
N, D, C = 120, 5, 3


def _data(n, seed):
    """Overlapping Gaussian classes, so the optimum is finite and samples matter unequally."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n)
    centers = np.random.default_rng(0).normal(size=(C, D)) * 1.5
    return torch.as_tensor(centers[labels] + rng.normal(size=(n, D))), torch.as_tensor(labels)


def _logits(theta, x):
    w = theta.reshape(C, D + 1)
    return x @ w[:, :D].T + w[:, D]


def _fit(x, y, weights, start):
    """argmin (1/N) Σ w_i ℓ_i + (μ/2)‖θ‖² by L-BFGS in float64, to a gradient of ~1e-12."""
    theta = start.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([theta], lr=1, max_iter=1000, tolerance_grad=1e-13, tolerance_change=1e-16,
                                  history_size=50, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = (weights * F.cross_entropy(_logits(theta, x), y, reduction="none")).sum() / N \
            + 0.5 * MU * theta.square().sum()
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(objective)
    return theta.detach()


def test_influence_predicts_leave_one_out_change_in_validation_loss():
    x, y = _data(N, seed=1)
    x_val, y_val = _data(60, seed=2)
    theta = _fit(x, y, torch.ones(N, dtype=torch.float64), torch.zeros(C * (D + 1), dtype=torch.float64))

    def val_loss(t):
        return F.cross_entropy(_logits(t, x_val), y_val)

    probs = torch.softmax(_logits(theta, x), 1)
    curvature = LastLayerCurvature.fit(x, probs, damping=MU)
    grads = head_gradients(x, probs, y)
    theta_var = theta.clone().requires_grad_(True)
    val_grad = torch.autograd.grad(val_loss(theta_var), theta_var)[0]   # same [W | b] row-major order
    predicted = torch.cholesky_solve(grads.T, curvature.cholesky).T @ val_grad / N  # (H + λI)⁻¹g

    removed = np.random.default_rng(3).choice(N, 30, replace=False)
    actual = []
    for j in removed:
        weights = torch.ones(N, dtype=torch.float64)
        weights[j] = 0.0
        actual.append(float(val_loss(_fit(x, y, weights, theta)) - val_loss(theta)))
    assert pearsonr(predicted[removed].numpy(), actual)[0] >= 0.95
