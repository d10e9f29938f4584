"""One CUDA GPU: the scorers give the CPU's scores for the same trained model (float32 kernels and
reduction orders differ, rankings must not). Skipped without a GPU; benchmarks/gpu_check.sh runs them."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_dataset
from scipy.stats import spearmanr

from engine.config import TrainConfig
from engine.finetune import FinetuneConfig
from engine.pipeline import with_injected_noise
from engine.scorers import ScoringContext, make_scorer, scorer_class
from engine.training import train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# case → (model, method, settings). EK-FAC over a ResNet-18 spends minutes on the CPU's eigendecompositions
# (layer inputs of 4,608 dimensions), so the whole-network EK-FAC runs on the small CNN.
CASES = {"tracin": ("resnet18", "tracin", {}),
         "fvm": ("resnet18", "fvm", {"finetune": FinetuneConfig(epochs=3)}),
         "fvm-ekfac-last": ("resnet18", "fvm", {"finetune": FinetuneConfig(epochs=3), "curvature": "ekfac-last"}),
         "if-ekfac": ("small-cnn", "if-ekfac", {"fisher": "exact"})}


@pytest.fixture(scope="module")
def trained_on_both():
    """Per architecture: one model trained on the CPU, and the same weights on the GPU."""
    noisy = with_injected_noise(make_dataset(classes=4, per_class=20, shape=(8, 8, 3)), rate=0.2, seed=0)
    validation = make_dataset(classes=4, per_class=8, shape=(8, 8, 3), seed=1)
    models = {}
    for name in ("resnet18", "small-cnn"):
        cpu = train(noisy.dataset, TrainConfig(model=name, epochs=3, batch_size=32, device="cpu"))
        models[name] = cpu, replace(cpu, model=copy.deepcopy(cpu.model).to("cuda"), device=torch.device("cuda"))
    return noisy.dataset, validation, models


@pytest.mark.parametrize("case", CASES)
def test_cuda_scores_equal_the_cpu_scores_of_the_same_model(trained_on_both, case):
    dataset, validation, models = trained_on_both
    model, method, changes = CASES[case]
    cpu, cuda = models[model]
    settings = replace(scorer_class(method).Settings(), **changes)
    on_cpu = make_scorer(method, settings).run(ScoringContext(dataset, cpu, validation))
    on_cuda = make_scorer(method, settings).run(ScoringContext(dataset, cuda, validation))
    assert spearmanr(on_cpu.scores, on_cuda.scores).statistic > 0.99
    np.testing.assert_allclose(on_cuda.scores, on_cpu.scores, rtol=0.05, atol=1e-6 * on_cpu.scores.max())
    assert (on_cuda.suggested_labels == on_cpu.suggested_labels).mean() > 0.95
