"""One CUDA GPU: the scorers give the CPU's scores for the same trained model (float32 kernels and
reduction orders differ, rankings must not). Skipped without a GPU; benchmarks/gpu_check.sh runs them."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_dataset
from scipy.stats import spearmanr

from engine.finetune import FinetuneConfig
from engine.pipeline import with_injected_noise
from engine.scorers import ScoringContext, make_scorer, scorer_class
from engine.training import TrainConfig, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

METHODS = {"tracin": {}, "if-ekfac": {"fisher": "exact"}, "fvm": {"finetune": FinetuneConfig(epochs=3)},
           "fvm-ekfac-last": {"finetune": FinetuneConfig(epochs=3), "curvature": "ekfac-last"}}


@pytest.fixture(scope="module")
def trained_on_both():
    noisy = with_injected_noise(make_dataset(classes=4, per_class=40, shape=(16, 16, 3)), rate=0.2, seed=0)
    validation = make_dataset(classes=4, per_class=10, shape=(16, 16, 3), seed=1)
    cpu = train(noisy.dataset, TrainConfig(model="resnet18", epochs=3, batch_size=32, device="cpu"))
    cuda = replace(cpu, model=copy.deepcopy(cpu.model).to("cuda"), device=torch.device("cuda"))
    return noisy.dataset, validation, cpu, cuda


@pytest.mark.parametrize("case", METHODS)
def test_cuda_scores_equal_the_cpu_scores_of_the_same_model(trained_on_both, case):
    dataset, validation, cpu, cuda = trained_on_both
    method = case.split("-ekfac-last")[0]
    settings = replace(scorer_class(method).Settings(), **METHODS[case])
    on_cpu = make_scorer(method, settings).run(ScoringContext(dataset, cpu, validation))
    on_cuda = make_scorer(method, settings).run(ScoringContext(dataset, cuda, validation))
    assert spearmanr(on_cpu.scores, on_cuda.scores).statistic > 0.99
    np.testing.assert_allclose(on_cuda.scores, on_cpu.scores, rtol=0.05, atol=1e-6 * on_cpu.scores.max())
    assert (on_cuda.suggested_labels == on_cpu.suggested_labels).mean() > 0.95
