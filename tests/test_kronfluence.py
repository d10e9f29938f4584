"""Our EK-FAC against Kronfluence's, the reference implementation docs/methods.md §3 names, on a small
convolutional model. kronfluence is in the dev extra (with the torchvision release built for
torch 2.13, which it requires but never imports), so CI runs it; skipped where it does not import.

Kronfluence fits EK-FAC on the per-row gradients of a task loss. Its fitting set here holds every
image C times, row (x, k) with loss √p_k(x)·ℓ(x, k) (p_k detached): the output gradient of that row
is √p_k (p − e_k), the k-th factor of our exact GGN (``fisher="exact"``). Kronfluence averages over
the N·C rows, we over the N images, so its corrected eigenvalues are ours / C; with the same
relative damping (0.1 × the mean eigenvalue, per layer, in both) its self-scores are C × ours.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from engine.curvature import EKFAC
from engine.task import ImageTask

kronfluence = pytest.importorskip("kronfluence")
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # kronfluence's own torch.cuda.amp use
TASK = ImageTask((0.3,), (0.3,))
CLASSES = 3


class WeightedClassification(Task):
    def compute_train_loss(self, batch, model, sample=False):
        inputs, labels, weights = batch
        return (weights * F.cross_entropy(model(inputs), labels, reduction="none")).sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.ReLU(),
                         nn.Linear(8, CLASSES)).double().eval()


def test_ekfac_self_scores_equal_kronfluence_times_the_number_of_classes(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 6, 6)).astype(np.uint8)
    labels = rng.integers(0, CLASSES, 40)
    model = _model()
    ours = EKFAC.fit(model, TASK, images, "cpu", fisher="exact", relative_damping=0.1, batch_size=16)
    our_scores = ours.scores(TASK, images, labels, "cpu", batch_size=16)

    x = TASK.inputs(images).double()
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    fit_rows = TensorDataset(x.repeat_interleave(CLASSES, 0), torch.arange(CLASSES).repeat(len(x)),
                             p.sqrt().flatten())
    score_rows = TensorDataset(x, torch.as_tensor(labels), torch.ones(len(x), dtype=torch.float64))
    task = WeightedClassification()
    wrapped = prepare_model(_model(), task)
    analyzer = Analyzer("check", wrapped, task, cpu=True, disable_tqdm=True, output_dir=str(tmp_path))
    f64 = torch.float64
    analyzer.fit_all_factors("ekfac", fit_rows, per_device_batch_size=30, factor_args=FactorArguments(
        strategy="ekfac", use_empirical_fisher=True, activation_covariance_dtype=f64, gradient_covariance_dtype=f64,
        eigendecomposition_dtype=f64, per_sample_gradient_dtype=f64, lambda_dtype=f64))
    analyzer.compute_self_scores("self", "ekfac", score_rows, per_device_train_batch_size=16,
                                 score_args=ScoreArguments(damping_factor=None, per_sample_gradient_dtype=f64,
                                                           precondition_dtype=f64, score_dtype=f64))
    theirs = analyzer.load_self_scores("self")["all_modules"].double().numpy()
    np.testing.assert_allclose(theirs, CLASSES * our_scores, rtol=1e-6)
