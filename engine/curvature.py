"""Damped Gauss-Newton curvature of the cross-entropy loss, for influence scores (docs/methods.md §3–§4).

Two levels, both of the *mean* loss over a fitting set (the training set for ``if-*``, the
trusted validation set for VM / FVM), both returning quadratic forms s = gᵀ(H + λI)⁻¹g:

* :class:`LastLayerCurvature`: the exact GGN of the head (weights and bias). A head gradient is
  g = (p − e_y) ⊗ â (â = features with a 1 appended), and H = (1/M) Σ_m (diag p_m − p_m p_mᵀ) ⊗ â_m â_mᵀ
  is built as FᵀF/M from the per-sample factors B_m = (I − p_m 1ᵀ) diag(√p_m). For the last layer
  of a cross-entropy model the GGN *is* the Hessian. One Cholesky, then triangular solves; every
  candidate label of every sample costs only a solve, no backward pass.
* :class:`EKFAC`: eigenvalue-corrected K-FAC over every Linear and Conv2d layer (BatchNorm affine
  parameters are left out, as in kronfluence). Per layer, the eigenvectors Q_A, Q_S of the input
  and output-gradient covariances give a Kronecker basis, and the diagonal of the GGN *in that
  basis*, Λ_ij = E[(Q_Sᵀ G Q_A)_ij²], replaces K-FAC's eigenvalue products (the correction that
  "Better Hessians Matter" shows to carry most of the quality). Layers are independent blocks.

The GGN of cross-entropy does not depend on the labels: E_{y∼p}[(p − e_y)(p − e_y)ᵀ] = diag p − ppᵀ.
The EK-FAC statistics therefore use output gradients √p_k (e_k − p), k = 1..C (``fisher="exact"``:
the GGN exactly, C backward passes per batch) or one label drawn from p per sample
(``fisher="sampled"``: unbiased, one backward pass, for many classes or large fitting sets). Labels
that may be wrong never enter the curvature.

Damping: λ = ``relative_damping`` × the mean eigenvalue (trace / dimension), per layer for EK-FAC
(the mean of that layer's Λ), unless an absolute ``damping`` is given.

Distributed (``distributed=``, :mod:`engine.distributed`): each rank passes its shard of the fitting
rows; every statistic is a sum over rows (GGN, covariances, eigenvalue corrections, the row count)
and is all-reduced before it is used, so every rank fits the curvature of the whole set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine.data import Dataset
from engine.distributed import LOCAL, Distributed
from engine.errors import OptionError
from engine.per_sample import DEFAULT_CHUNK_ELEMENTS, LayerCapture
from engine.progress import Progress, no_progress
from engine.sources import batches
from engine.task import Task
from engine.training import Predictions

FISHER_MODES = ("exact", "sampled")
DEFAULT_RELATIVE_DAMPING = 0.1  # docs/methods.md §3: 0.1 × the mean eigenvalue
# The exact head GGN holds (C·D)² float64 numbers: above this dimension (8192² × 8 B = 512 MiB) the
# head's curvature is EK-FAC instead (CIFAR-100 on a 512-wide head: C·D = 51,300, ~21 GB exact).
MAX_EXACT_HEAD_DIM = 8192
HEAD_CURVATURES = ("last", "ekfac-last")


def _as_tensor(array, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array,
                           dtype=dtype, device=device)


def _with_bias(features: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([features, features.new_ones(len(features), 1)], dim=1) if bias else features


def _rows_per_chunk(elements_per_row: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // max(1, elements_per_row))


def _damping(mean_eigenvalue: float, relative: float, absolute: float | None) -> float:
    """The absolute damping if given, else ``relative`` × the mean eigenvalue (floored: a dead layer
    with all-zero curvature must still give a positive definite system)."""
    if absolute is not None:
        return float(absolute)
    return float(relative * mean_eigenvalue) or 1e-12


def last_layer_ggn(features, probabilities, *, bias: bool = True, dtype: torch.dtype = torch.float64,
                   device: torch.device | str = "cpu", distributed: Distributed = LOCAL) -> torch.Tensor:
    """The exact head GGN of the mean cross-entropy, (C·D, C·D), accumulated as FᵀF/M in row chunks
    (FᵀF and M summed over the ranks' shards of the rows).

    Row k of sample m's factor is B_m[:, k] ⊗ â_m with B_m = (I − p_m 1ᵀ) diag(√p_m), so that
    B_m B_mᵀ = diag p_m − p_m p_mᵀ and Σ_k (B_m[:, k] ⊗ â_m)(…)ᵀ = (diag p_m − p_m p_mᵀ) ⊗ â_m â_mᵀ.
    """
    p = _as_tensor(probabilities, dtype, device)
    a = _with_bias(_as_tensor(features, dtype, device), bias)
    (m, c), d = p.shape, a.shape[1]
    eye = torch.eye(c, dtype=dtype, device=device)
    ggn = torch.zeros(c * d, c * d, dtype=dtype, device=device)
    step = _rows_per_chunk(c * c * d)
    for lo in range(0, m, step):
        pc, ac = p[lo:lo + step], a[lo:lo + step]
        factor = (eye - pc[:, :, None]) * pc.sqrt()[:, None, :]            # (m, C, C): B_m
        rows = (factor.transpose(1, 2)[:, :, :, None] * ac[:, None, None, :]).reshape(-1, c * d)
        ggn.addmm_(rows.T, rows)
    return distributed.all_reduce_sum(ggn) / int(distributed.all_reduce_sum(torch.tensor(m)))


@dataclass(frozen=True)
class LastLayerCurvature:
    """The Cholesky factor L of H + λI for the head GGN; quadratic forms are triangular solves."""

    cholesky: torch.Tensor
    damping: float
    bias: bool
    num_classes: int

    @classmethod
    def fit(cls, features, probabilities, *, bias: bool = True,
            relative_damping: float = DEFAULT_RELATIVE_DAMPING, damping: float | None = None,
            dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
            distributed: Distributed = LOCAL) -> LastLayerCurvature:
        """Fit on the fitting set's penultimate features (M, d) and softmax outputs (M, C) (this
        rank's shard of them in a distributed run)."""
        ggn = last_layer_ggn(features, probabilities, bias=bias, dtype=dtype, device=device, distributed=distributed)
        lam = _damping(float(ggn.diagonal().mean()), relative_damping, damping)
        ggn.diagonal().add_(lam)
        return cls(torch.linalg.cholesky(ggn), lam, bias, int(np.shape(probabilities)[1]))

    @property
    def dim(self) -> int:
        return self.cholesky.shape[0]

    kind = "last"

    def to_state(self) -> dict:
        return {"kind": self.kind, "cholesky": self.cholesky.cpu(), "damping": self.damping, "bias": self.bias,
                "num_classes": self.num_classes}

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str) -> LastLayerCurvature:
        return cls(state["cholesky"].to(device), state["damping"], state["bias"], state["num_classes"])

    def quadratic_form(self, vectors: torch.Tensor) -> torch.Tensor:
        """vᵀ(H + λI)⁻¹v for each row v of ``vectors`` (n, dim): ‖L⁻¹v‖²."""
        v = vectors.to(self.cholesky.dtype).to(self.cholesky.device)
        return torch.linalg.solve_triangular(self.cholesky, v.T, upper=False).square().sum(0)

    def candidate_scores(self, features, probabilities) -> np.ndarray:
        """s(z, c) = g(z, c)ᵀ(H + λI)⁻¹g(z, c) for every sample and every label c, (N, C) float64.

        g(z, c) = (p − e_c) ⊗ â: the score under the given label is column y, the relabel
        suggestion is the argmin over the row; all C candidates from one forward pass.
        """
        dtype, device, c = self.cholesky.dtype, self.cholesky.device, self.num_classes
        out = np.empty((len(probabilities), c))
        step = _rows_per_chunk(c * self.dim)
        for lo in range(0, len(out), step):  # rows converted per chunk: N×D in float64 is 2 GB at 1M × 256
            p = _as_tensor(probabilities[lo:lo + step], dtype, device)
            a = _with_bias(_as_tensor(features[lo:lo + step], dtype, device), self.bias)
            residuals = p[:, None, :] - torch.eye(c, dtype=dtype, device=device)   # (rows, candidate, C)
            v = residuals[:, :, :, None] * a[:, None, None, :]
            out[lo:lo + step] = self.quadratic_form(v.reshape(-1, self.dim)).reshape(-1, c).double().cpu().numpy()
        return out


@dataclass(frozen=True)
class HeadEKFAC:
    """EK-FAC of the head's GGN, from forward passes only: for 100 classes on a 512-wide head the
    exact (C·D)² matrix would need ~21 GB, this C² + D² + C·D numbers.

    K-FAC factors A = E[â âᵀ] and S = E[diag p − ppᵀ] (the exact output-gradient covariance under the
    GGN) give the basis Q_S ⊗ Q_A; the eigenvalues are corrected to the GGN's own diagonal in it,
    Λ_ij = E_m[(q_Siᵀ(diag p_m − p_m p_mᵀ)q_Si)(q_Ajᵀ â_m)²]. Where every sample has the same p the
    GGN is exactly S ⊗ A and this equals :class:`LastLayerCurvature`.
    """

    q_s: torch.Tensor          # (C, C)
    q_a: torch.Tensor          # (D, D)
    eigenvalues: torch.Tensor  # (C, D)
    damping: float
    bias: bool
    num_classes: int

    kind = "ekfac-last"

    @classmethod
    def fit(cls, features, probabilities, *, bias: bool = True,
            relative_damping: float = DEFAULT_RELATIVE_DAMPING, damping: float | None = None,
            dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
            distributed: Distributed = LOCAL) -> HeadEKFAC:
        p = _as_tensor(probabilities, dtype, device)
        a = _with_bias(_as_tensor(features, dtype, device), bias)
        m = int(distributed.all_reduce_sum(torch.tensor(len(p))))
        cov_a = distributed.all_reduce_sum(a.T @ a) / m
        cov_s = distributed.all_reduce_sum(torch.diag(p.sum(0)) - p.T @ p) / m
        q_a, q_s = torch.linalg.eigh(cov_a)[1], torch.linalg.eigh(cov_s)[1]
        ps = p @ q_s                                                       # (M, C): p_mᵀ q_Si
        s_diag = (p @ q_s.square()) - ps.square()                          # q_Siᵀ(diag p − ppᵀ)q_Si
        eigenvalues = distributed.all_reduce_sum(s_diag.T @ (a @ q_a).square()) / m
        lam = _damping(float(eigenvalues.mean()), relative_damping, damping)
        return cls(q_s, q_a, eigenvalues, lam, bias, p.shape[1])

    @property
    def dim(self) -> int:
        return self.eigenvalues.numel()

    def candidate_scores(self, features, probabilities) -> np.ndarray:
        """s(z, c) = Σ_ij (Q_Sᵀ(p − e_c))_i² (Q_Aᵀâ)_j² / (Λ_ij + λ), (N, C) float64."""
        dtype, device = self.q_s.dtype, self.q_s.device
        out = np.empty((len(probabilities), self.num_classes))
        step = _rows_per_chunk(self.num_classes * self.num_classes + self.q_a.shape[1])
        for lo in range(0, len(out), step):  # rows converted per chunk, as in LastLayerCurvature
            p = _as_tensor(probabilities[lo:lo + step], dtype, device)
            a = _with_bias(_as_tensor(features[lo:lo + step], dtype, device), self.bias)
            per_class = (a @ self.q_a).square() @ (1.0 / (self.eigenvalues + self.damping)).T   # (rows, C): Σ_j
            rotated = (p[:, None, :] - torch.eye(self.num_classes, dtype=dtype, device=device)) @ self.q_s
            out[lo:lo + step] = torch.einsum("nci,ni->nc", rotated.square(), per_class).double().cpu().numpy()
        return out

    def to_state(self) -> dict:
        return {"kind": self.kind, "q_s": self.q_s.cpu(), "q_a": self.q_a.cpu(), "eigenvalues": self.eigenvalues.cpu(),
                "damping": self.damping, "bias": self.bias, "num_classes": self.num_classes}

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str) -> HeadEKFAC:
        return cls(state["q_s"].to(device), state["q_a"].to(device), state["eigenvalues"].to(device),
                   state["damping"], state["bias"], state["num_classes"])


# ---- EK-FAC -------------------------------------------------------------------------------------

def curvature_layers(model: nn.Module) -> list[nn.Module]:
    """The Linear and Conv2d layers with trainable weights, in module order (EK-FAC's blocks)."""
    return [m for m in model.modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _batched_passes(model: nn.Module, layers: list[nn.Module], task: Task, images: np.ndarray,
                    device: torch.device | str, batch_size: int,
                    output_gradients: Callable[[torch.Tensor, int], list[torch.Tensor]],
                    progress: Progress, message: str) -> Iterator[tuple[int, int, int, LayerCapture]]:
    """One forward per batch, then one backward per output gradient from ``output_gradients(p, lo)``.

    Yields ``(lo, hi, k, capture)`` after the k-th backward: ``capture.factors(layer)`` then holds
    the batch's inputs and the output gradients of that pass. The model runs in eval mode
    (BatchNorm with running statistics: per-sample gradients need independent samples).
    """
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    try:
        with LayerCapture(model, layers) as capture:
            for positions, batch in batches(images, batch_size=batch_size):
                lo, hi = int(positions[0]), int(positions[-1]) + 1
                x = task.inputs(batch, device).to(dtype).requires_grad_(True)
                logits = model(x)
                grads = output_gradients(torch.softmax(logits.detach().double(), dim=1), lo)
                for k, g in enumerate(grads):
                    torch.autograd.grad(logits, x, grad_outputs=g.to(logits.dtype),
                                        retain_graph=k < len(grads) - 1)
                    yield lo, hi, k, capture
                capture.clear()
                progress(hi, len(images), message)
    finally:
        model.train(was_training)


def _fisher_gradients(fisher: str, uniforms: np.ndarray) -> Callable[[torch.Tensor, int], list[torch.Tensor]]:
    """Output gradients whose outer products average to the GGN's diag p − ppᵀ.

    ``sampled`` draws row i's label by inverting p's CDF at ``uniforms[i]``: fixed per sample, so
    the draw does not depend on batching or on where the row sits.
    """
    def exact(p: torch.Tensor, lo: int) -> list[torch.Tensor]:
        eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
        return [p[:, k:k + 1].sqrt() * (eye[k] - p) for k in range(p.shape[1])]

    def sampled(p: torch.Tensor, lo: int) -> list[torch.Tensor]:
        u = torch.as_tensor(uniforms[lo:lo + len(p)], dtype=p.dtype, device=p.device)
        labels = (p.cumsum(1) < u[:, None]).sum(1).clamp(max=p.shape[1] - 1)
        return [label_gradients(p, labels)]

    return exact if fisher == "exact" else sampled


def sample_uniforms(sample_ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform in [0, 1) per sample id (splitmix64 of id and seed): the same id, the same draw."""
    with np.errstate(over="ignore"):
        z = np.asarray(sample_ids, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def label_gradients(probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """∂ℓ/∂logits = p − e_y for each row (the output gradient of the summed cross-entropy)."""
    out = probabilities.clone()
    out[torch.arange(len(out), device=out.device), labels] -= 1.0
    return out


@dataclass
class _LayerBasis:
    q_a: torch.Tensor          # (d_in, d_in) eigenvectors of E[a aᵀ]
    q_s: torch.Tensor          # (d_out, d_out) eigenvectors of E[b bᵀ]
    eigenvalues: torch.Tensor  # (d_out, d_in) corrected: E[(Q_Sᵀ G Q_A)²]
    damping: float


def _rotated_gradients(a_rot: torch.Tensor, b: torch.Tensor, q_s: torch.Tensor) -> torch.Tensor:
    """Q_Sᵀ G_i Q_A = Σ_s (Q_Sᵀ b_s)(Q_Aᵀ a_s)ᵀ per sample, (B, d_out, d_in), from rotated inputs."""
    return torch.bmm((b @ q_s).transpose(1, 2), a_rot)


class EKFAC:
    """Eigenvalue-corrected K-FAC of the mean cross-entropy GGN over Linear and Conv2d layers.

    ``EKFAC.fit(model, task, images, device)`` runs two passes over the fitting set (covariances,
    then the eigenvalue correction); :meth:`scores` gives gᵀ(H + λI)⁻¹g for other samples under
    their labels, or under every candidate label. Scores are for the model the fit was made on
    (the same module objects, unchanged weights).
    """

    def __init__(self, model: nn.Module, bases: dict[nn.Module, _LayerBasis], names: list[str]):
        self.model, self.bases, self.names = model, bases, names

    @classmethod
    def fit(cls, model: nn.Module, task: Task, images: np.ndarray, device: torch.device | str, *,
            layers: list[nn.Module] | None = None, fisher: str = "exact",
            relative_damping: float = DEFAULT_RELATIVE_DAMPING, damping: float | None = None,
            batch_size: int = 256, seed: int = 0, sample_ids: np.ndarray | None = None,
            progress: Progress = no_progress, distributed: Distributed = LOCAL) -> EKFAC:
        """Fit on ``images`` (this rank's shard of the fitting rows in a distributed run);
        ``sample_ids`` (default: row positions) fix each row's sampled Fisher label, so pass the
        dataset's stable index to make the fit independent of row order and of the sharding."""
        if fisher not in FISHER_MODES:
            raise OptionError("fisher", fisher, FISHER_MODES)
        layers = list(layers) if layers is not None else curvature_layers(model)
        names = {module: name for name, module in model.named_modules()}
        args = (model, layers, task, images, device, batch_size)

        ids = np.arange(len(images)) if sample_ids is None else np.asarray(sample_ids)
        uniforms = sample_uniforms(ids, seed)

        def gradients():  # the same sampled labels in both passes
            return _fisher_gradients(fisher, uniforms)

        # Pass 1: covariances of layer inputs (over samples and positions) and output gradients.
        # Running sums in float64, from zero tensors of each layer's factor sizes.
        sizes = {layer: _factor_sizes(layer) for layer in layers}
        cov_a = {layer: _zeros(layer, sizes[layer][0], sizes[layer][0]) for layer in layers}
        cov_s = {layer: _zeros(layer, sizes[layer][1], sizes[layer][1]) for layer in layers}
        for _, _, k, capture in _batched_passes(*args, gradients(), _half(progress, 0), "EK-FAC: covariances"):
            for layer in layers:
                a, b = capture.factors(layer)
                if k == 0:  # one batch in the compute dtype, the running sum in float64
                    cov_a[layer] = cov_a[layer] + (_flat(a).T @ _flat(a)).double()
                cov_s[layer] = cov_s[layer] + (_flat(b).T @ _flat(b)).double()
        cov_a = {layer: distributed.all_reduce_sum(cov) for layer, cov in cov_a.items()}
        cov_s = {layer: distributed.all_reduce_sum(cov) for layer, cov in cov_s.items()}
        dtype = next(model.parameters()).dtype
        eigvecs = {layer: (torch.linalg.eigh(cov_a[layer])[1].to(dtype), torch.linalg.eigh(cov_s[layer])[1].to(dtype))
                   for layer in layers}

        # Pass 2: the diagonal of the GGN in each layer's Kronecker eigenbasis.
        sums = {layer: _zeros(layer, sizes[layer][1], sizes[layer][0]) for layer in layers}
        rotated_a: dict[nn.Module, torch.Tensor] = {}
        for _, _, k, capture in _batched_passes(*args, gradients(), _half(progress, 1), "EK-FAC: eigenvalues"):
            for layer in layers:
                q_a, q_s = eigvecs[layer]
                a, b = capture.factors(layer)
                if k == 0:
                    rotated_a[layer] = a @ q_a
                sums[layer] = sums[layer] + _chunked_sum_sq(rotated_a[layer], b, q_s)
        n = int(distributed.all_reduce_sum(torch.tensor(len(images))))
        bases = {}
        for layer in layers:
            eigenvalues = distributed.all_reduce_sum(sums[layer]) / n
            lam = _damping(float(eigenvalues.mean()), relative_damping, damping)
            bases[layer] = _LayerBasis(*eigvecs[layer], eigenvalues.to(dtype), lam)
        return cls(model, bases, [names[layer] for layer in layers])

    kind = "ekfac"

    def to_state(self) -> dict:
        return {"kind": self.kind, "names": list(self.names),
                "bases": [{"q_a": b.q_a.cpu(), "q_s": b.q_s.cpu(), "eigenvalues": b.eigenvalues.cpu(),
                           "damping": b.damping} for b in self.bases.values()]}

    @classmethod
    def from_state(cls, state: dict, model: nn.Module, device: torch.device | str) -> EKFAC:
        """The bases re-attached to ``model``'s layers by name (scores run through the fitted model)."""
        modules = dict(model.named_modules())
        bases = {modules[name]: _LayerBasis(b["q_a"].to(device), b["q_s"].to(device), b["eigenvalues"].to(device),
                                            b["damping"])
                 for name, b in zip(state["names"], state["bases"], strict=True)}
        return cls(model, bases, state["names"])

    @property
    def dampings(self) -> dict[str, float]:
        return {name: basis.damping for name, basis in zip(self.names, self.bases.values(), strict=True)}

    def scores(self, task: Task, images: np.ndarray, labels: np.ndarray | None, device: torch.device | str, *,
               batch_size: int = 256, progress: Progress = no_progress) -> np.ndarray:
        """Σ_layers Σ_ij (Q_Sᵀ G Q_A)_ij² / (Λ_ij + λ) per sample, float64.

        ``labels`` given: (N,) under those labels, one backward pass per batch. ``labels=None``:
        (N, C) under every candidate label c (C backward passes per batch), for relabelling.
        """
        layers = list(self.bases)
        candidates = 0

        def output_gradients(p: torch.Tensor, lo: int) -> list[torch.Tensor]:
            nonlocal candidates
            if labels is not None:
                y = torch.as_tensor(np.asarray(labels[lo:lo + len(p)]), device=p.device)
                return [label_gradients(p, y)]
            candidates = p.shape[1]
            eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
            return [p - eye[c] for c in range(p.shape[1])]

        out: np.ndarray | None = None
        rotated_a: dict[nn.Module, torch.Tensor] = {}
        message = "EK-FAC scores" if labels is not None else "EK-FAC scores: every candidate label"
        for lo, hi, k, capture in _batched_passes(self.model, layers, task, images, device, batch_size,
                                                  output_gradients, progress, message):
            total = 0
            for layer in layers:
                basis = self.bases[layer]
                a, b = capture.factors(layer)
                if k == 0:
                    rotated_a[layer] = a @ basis.q_a
                total = total + _chunked_weighted_sq(rotated_a[layer], b, basis)
            if out is None:
                out = np.empty((len(images), max(1, candidates)))
            out[lo:hi, k] = total.double().cpu().numpy()
        return out[:, 0] if labels is not None else out


def _factor_sizes(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of :meth:`LayerCapture.factors`: inputs (patches for Conv2d) with the bias column."""
    return layer.weight[0].numel() + (layer.bias is not None), layer.weight.shape[0]


def _zeros(layer: nn.Module, rows: int, columns: int) -> torch.Tensor:
    return torch.zeros(rows, columns, dtype=torch.float64, device=layer.weight.device)


def _chunks(a_rot: torch.Tensor, b: torch.Tensor) -> Iterator[slice]:
    step = _rows_per_chunk(b.shape[-1] * a_rot.shape[-1] + a_rot[0].numel() + b[0].numel())
    for lo in range(0, len(b), step):
        yield slice(lo, lo + step)


def _chunked_sum_sq(a_rot: torch.Tensor, b: torch.Tensor, q_s: torch.Tensor) -> torch.Tensor:
    """Σ_i (Q_Sᵀ G_i Q_A)², summed over the batch, (d_out, d_in) in float64."""
    return sum(_rotated_gradients(a_rot[rows], b[rows], q_s).square().sum(0).double() for rows in _chunks(a_rot, b))


def _chunked_weighted_sq(a_rot: torch.Tensor, b: torch.Tensor, basis: _LayerBasis) -> torch.Tensor:
    """(B,) Σ_ij (Q_Sᵀ G_i Q_A)_ij² / (Λ_ij + λ)."""
    weights = 1.0 / (basis.eigenvalues + basis.damping)
    return torch.cat([(_rotated_gradients(a_rot[rows], b[rows], basis.q_s).square() * weights).sum((1, 2))
                      for rows in _chunks(a_rot, b)])


def _half(progress: Progress, part: int) -> Progress:
    """Map one of the two fitting passes onto a single progress bar."""
    def report(done: int, total: int, message: str) -> None:
        progress(part * total + done, 2 * total, message)
    return report


# ---- Influence from a fitted curvature: shared by the if-* and vm / fvm scorers ------------------

Curvature = LastLayerCurvature | HeadEKFAC | EKFAC


def curvature_from_state(state: dict, model: nn.Module, device: torch.device | str) -> Curvature:
    """Any curvature's ``to_state()`` back (EK-FAC re-attached to ``model``)."""
    if state["kind"] == EKFAC.kind:
        return EKFAC.from_state(state, model, device)
    return {c.kind: c for c in (LastLayerCurvature, HeadEKFAC)}[state["kind"]].from_state(state, device)


def check_damping(damping: float) -> None:
    if not damping > 0:
        raise OptionError("damping", damping, ["a positive multiple of the mean curvature eigenvalue"])


@dataclass(frozen=True)
class EKFACSettings:
    """The EK-FAC settings of every scorer that may fit it (``if-ekfac``, ``fvm`` / ``vm`` with
    ``curvature="ekfac"``): their ``Settings`` extend this one, and :meth:`check_ekfac` refuses bad
    values when the scorer is made, before any training or fine-tuning."""

    damping: float = DEFAULT_RELATIVE_DAMPING  # λ per layer, a multiple of its mean (corrected) eigenvalue
    fisher: str = "exact"  # exact GGN (C backward passes per batch) or one label sampled from p (one)
    candidate_labels: bool = False  # suggestions by argmin over every label (C backward passes) instead of argmax
    batch_size: int = 256  # rows per forward / backward pass of the fit and the scores
    seed: int = 0  # sampled Fisher labels

    def check_ekfac(self) -> None:
        check_damping(self.damping)
        if self.fisher not in FISHER_MODES:
            raise OptionError("fisher", self.fisher, FISHER_MODES)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise OptionError("batch_size", self.batch_size, ["a positive integer"])
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise OptionError("seed", self.seed, ["an integer in 0..2³²−1"])


def head_dimension(model: nn.Module) -> int:
    """C·D of the head's weights and bias: the side of its exact GGN."""
    return model.head.weight.numel() + (model.head.bias.numel() if model.head.bias is not None else 0)


def head_curvature_kind(model: nn.Module, requested: str = "last") -> tuple[str, str | None]:
    """The head curvature to fit and, when the exact one was asked for but is too large, why not."""
    dim = head_dimension(model)
    if requested == "last" and dim > MAX_EXACT_HEAD_DIM:
        return "ekfac-last", (f"the exact head GGN would hold ({dim:,})² numbers ({dim**2 * 8 / 2**30:.1f} GiB), above "
                              f"the {MAX_EXACT_HEAD_DIM:,}-dimension limit: EK-FAC of the head was used instead")
    return requested, None


def fit_head_curvature(model: nn.Module, fit: Predictions, device: torch.device, damping: float,
                       distributed: Distributed = LOCAL, kind: str = "last") -> LastLayerCurvature | HeadEKFAC:
    """The head GGN of the mean loss over the fitting rows' predictions (this rank's shard of them,
    summed across ranks), damped: exact for ``last``, EK-FAC for ``ekfac-last``."""
    curvature = HeadEKFAC if kind == "ekfac-last" else LastLayerCurvature
    return curvature.fit(fit.features, fit.probabilities, bias=model.head.bias is not None,
                         relative_damping=damping, device=device, distributed=distributed)


def head_influence(curvature: LastLayerCurvature | HeadEKFAC, target: Predictions,
                   labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Scores gᵀ(H + λI)⁻¹g under the given labels, argmin-over-candidates suggestions, and the
    curvature's info."""
    candidates = curvature.candidate_scores(target.features, target.probabilities)
    info = {"layers": ["head"], "curvature": curvature.kind, "damping": curvature.damping,
            "curvature_dim": curvature.dim}
    return candidates[np.arange(len(labels)), labels], candidates.argmin(1), info


def fit_ekfac(model: nn.Module, task: Task, fit: Dataset, device: torch.device, settings: EKFACSettings,
              progress: Progress, distributed: Distributed = LOCAL) -> EKFAC:
    """EK-FAC on the fitting rows (this rank's shard of them, summed across ranks); sampled Fisher
    labels keyed by their stable index (free of the order and of the sharding)."""
    return EKFAC.fit(model, task, fit.images, device, fisher=settings.fisher, relative_damping=settings.damping,
                     batch_size=settings.batch_size, seed=settings.seed, sample_ids=fit.index, progress=progress,
                     distributed=distributed)


def ekfac_influence(ekfac: EKFAC, task: Task, images: np.ndarray, labels: np.ndarray, device: torch.device,
                    settings: EKFACSettings, fallback_suggestions: np.ndarray,
                    progress: Progress) -> tuple[np.ndarray, np.ndarray, dict]:
    """EK-FAC scores; suggestions by argmin over candidates (C backward passes per batch) when
    ``settings.candidate_labels``, else ``fallback_suggestions`` (the model's argmax)."""
    info = {"layers": ekfac.names, "curvature": "ekfac", "damping": ekfac.dampings, "fisher": settings.fisher}
    if settings.candidate_labels:
        candidates = ekfac.scores(task, images, None, device, batch_size=settings.batch_size, progress=progress)
        return candidates[np.arange(len(labels)), labels], candidates.argmin(1), info
    scores = ekfac.scores(task, images, labels, device, batch_size=settings.batch_size, progress=progress)
    return scores, fallback_suggestions, info
