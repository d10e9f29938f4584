"""TracIn scorers: brute-force equality, invariances, and planted-noise detection."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_dataset
from test_per_sample import brute_force_sq_norms

from engine.config import TrainConfig
from engine.data import Dataset, load_dataset
from engine.errors import OptionError
from engine.metrics import detection_metrics
from engine.models import BasicBlock
from engine.per_sample import per_sample_grad_sq_norms
from engine.pipeline import score_methods, with_injected_noise
from engine.scorers import ScoringContext, make_scorer, scorer_class
from engine.scorers.tracin import activation_dropout_member, dropout_member
from engine.training import train

TINY = TrainConfig(epochs=3, checkpoints=3, batch_size=6, device="cpu")


@pytest.fixture(scope="module")
def tiny():
    noisy = with_injected_noise(make_dataset(classes=3, per_class=8), rate=0.2, seed=0)
    return noisy.dataset, train(noisy.dataset, TINY)


def _score(name, dataset, trained, **settings):
    scorer = make_scorer(name, scorer_class(name).Settings(**settings))
    return scorer.run(ScoringContext(dataset, trained))


def _brute_force_tracin(dataset, trained, params_of):
    x = trained.task.inputs(dataset.images).double()
    y = torch.as_tensor(dataset.labels)
    total = np.zeros(len(dataset))
    for checkpoint in trained.checkpoints:
        model = trained.model_at(checkpoint).double()
        total += checkpoint.step_weight * brute_force_sq_norms(model, x, y, params_of(model)).numpy()
    return total


def _step_rates(config, steps_per_epoch):
    """The learning rate of every optimizer step, replayed from the schedule alone (no training)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate,
                                                   total_steps=config.epochs * steps_per_epoch, pct_start=0.25)
    rates = []
    for _ in range(config.epochs * steps_per_epoch):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return np.asarray(rates)


def test_checkpoints_fewer_than_epochs_weigh_every_step_since_the_previous_one(tiny):
    # 5 epochs, 2 checkpoints (epochs 2 and 5): checkpoint 1 stands for epochs 1-2, checkpoint 2 for
    # epochs 3-5. TracIn-CP weighs each by the sum of those steps' rates, not its own epoch's mean.
    dataset, _ = tiny
    config = TrainConfig(epochs=5, checkpoints=2, batch_size=6, device="cpu")
    trained = train(dataset, config)
    steps = len(dataset) // config.batch_size
    rates = _step_rates(config, steps)
    assert [c.epoch for c in trained.checkpoints] == [2, 5]
    expected_weights = [rates[:2 * steps].sum(), rates[2 * steps:].sum()]
    np.testing.assert_allclose([c.step_weight for c in trained.checkpoints], expected_weights, rtol=1e-9)
    x, y = trained.task.inputs(dataset.images).double(), torch.as_tensor(dataset.labels)
    models = [trained.model_at(c).double() for c in trained.checkpoints]
    expected = sum(w * brute_force_sq_norms(m, x, y, [m.head.weight, m.head.bias]).numpy()
                   for w, m in zip(expected_weights, models, strict=True))
    np.testing.assert_allclose(_score("tracin-last", dataset, trained).scores, expected, rtol=1e-4)


def test_tracin_last_equals_brute_force_head_gradients(tiny):
    dataset, trained = tiny
    result = _score("tracin-last", dataset, trained)
    expected = _brute_force_tracin(dataset, trained, lambda m: [m.head.weight, m.head.bias])
    np.testing.assert_allclose(result.scores, expected, rtol=1e-4)
    assert [c["epoch"] for c in result.info["checkpoints"]] == [1, 2, 3]
    for said, checkpoint in zip(result.info["checkpoints"], trained.checkpoints, strict=True):  # a mean, named so
        assert said["mean_learning_rate"] * said["steps"] == pytest.approx(checkpoint.step_weight)
    np.testing.assert_array_equal(result.suggested_labels, ScoringContext(dataset, trained).predictions.predicted)


def test_shared_predictions_replace_the_contexts_own_and_must_fit_its_rows(tiny):
    dataset, trained = tiny
    context, own = ScoringContext(dataset, trained), ScoringContext(dataset, trained).predictions
    shared = type(own)(own.logits * 2, own.features)
    context.share_predictions(shared)
    assert context.predictions is shared
    with pytest.raises(ValueError, match="predictions for"):
        context.share_predictions(type(own)(own.logits[:3], own.features[:3]))


def test_tracin_equals_brute_force_full_model_gradients(tiny):
    dataset, trained = tiny
    result = _score("tracin", dataset, trained)
    expected = _brute_force_tracin(dataset, trained, lambda m: list(m.parameters()))
    np.testing.assert_allclose(result.scores, expected, rtol=1e-4)
    assert result.info["layers"][-1] == "head" and len(result.info["layers"]) == 7  # 3 × (conv, BN) + head


@pytest.mark.parametrize("name", ["tracin-last", "tracin", "tracin-ensemble"])
def test_self_scores_invariant_to_batch_size_and_row_order(tiny, name):
    dataset, trained = tiny
    scores = _score(name, dataset, trained).scores
    if name != "tracin-last":
        np.testing.assert_allclose(_score(name, dataset, trained, batch_size=5).scores, scores, rtol=1e-5)
    perm = np.random.default_rng(3).permutation(len(dataset))
    np.testing.assert_allclose(_score(name, dataset.subset(perm), trained).scores, scores[perm], rtol=1e-5)


def test_ensemble_member_zero_is_the_final_model_and_members_add(tiny):
    dataset, trained = tiny
    final = per_sample_grad_sq_norms(trained.model, trained.task, dataset.images, dataset.labels, "cpu")
    np.testing.assert_allclose(_score("tracin-ensemble", dataset, trained, members=1).scores, final, rtol=1e-5)
    three = _score("tracin-ensemble", dataset, trained, members=3, max_dropout=0.2)
    rates = three.info["dropout_rates"]
    assert rates[0] == 0.0 and all(0 < r <= 0.2 for r in rates[1:])
    np.testing.assert_allclose(_score("tracin-ensemble", dataset, trained, members=3, max_dropout=0.2).scores,
                               three.scores)  # seeded
    assert not np.allclose(three.scores, 3 * final, rtol=1e-3)  # the members really differ


@pytest.mark.parametrize("last_layer_only", [True, False])
def test_activation_dropout_ensemble_equals_brute_force_gradients_of_its_members(tiny, last_layer_only):
    # The paper's ensemble: member k is the final model with dropout masks on its hidden activations;
    # its score is the per-sample squared gradient norm through those masks, one backward per sample.
    dataset, trained = tiny
    result = _score("tracin-ensemble", dataset, trained, members=3, max_dropout=0.3, last_layer_only=last_layer_only)
    assert result.info["dropout"] == "activation"
    rates, generator = result.info["dropout_rates"], torch.Generator().manual_seed(0)
    x, y = trained.task.inputs(dataset.images).double(), torch.as_tensor(dataset.labels)
    expected = 0
    for rate in rates:
        member = activation_dropout_member(trained.model, rate, generator).double()
        params = [member.head.weight, member.head.bias] if last_layer_only else list(member.parameters())
        expected = expected + brute_force_sq_norms(member, x, y, params).numpy()
    np.testing.assert_allclose(result.scores, expected, rtol=1e-4)


def test_activation_dropout_member_masks_hidden_inputs_alike_for_every_sample_and_rescales():
    model = torch.nn.Sequential(torch.nn.Linear(4, 400), torch.nn.Tanh(), torch.nn.Linear(400, 3))
    member = activation_dropout_member(model, 0.25, torch.Generator().manual_seed(0))
    seen = []
    member[2].register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
    x = torch.randn(2, 4)
    member(x)
    hidden = model[1](model[0](x))
    kept = seen[0] != 0
    assert torch.equal(kept[0], kept[1])  # one mask per member, shared by the samples
    assert 0.18 < 1 - kept[0].float().mean() < 0.32
    torch.testing.assert_close(seen[0][kept], (hidden / 0.75)[kept])
    torch.testing.assert_close(activation_dropout_member(model, 0.0, torch.Generator())(x), model(x))


class _Residual(torch.nn.Module):
    """A stem, a block with an identity shortcut, a block with a convolution shortcut, pooling, a head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
        self.block1, self.block2 = BasicBlock(4, 4, 1), BasicBlock(4, 6, 2)
        self.head = torch.nn.Linear(6, 3)

    def features(self, x):
        return self.block2(self.block1(self.stem(x))).mean((2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def test_activation_dropout_on_a_residual_net_drops_each_activation_once():
    """Dropout of the activations: the stem's ReLU output, each block's inner ReLU output and each block's
    output, one mask each, drawn in that order. So a block's identity shortcut and its first convolution
    read the same dropped tensor (dropping each layer's input would leave the shortcut undropped and give
    conv1 and a shortcut convolution masks of their own). The expected logits are computed by hand."""
    torch.manual_seed(0)
    model = _Residual().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial running statistics
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    rate, x = 0.3, torch.randn(5, 1, 8, 8)
    member = activation_dropout_member(model, rate, torch.Generator().manual_seed(7))
    got = member(x)
    generator = torch.Generator().manual_seed(7)

    def dropped(t):
        return t * ((torch.rand(t.shape[1:], generator=generator) >= rate).float() / (1 - rate))

    def block(b, h):
        inner = dropped(F.relu(F.batch_norm(F.conv2d(h, b.conv1.weight, stride=b.conv1.stride, padding=1),
                                            b.bn1.running_mean, b.bn1.running_var, b.bn1.weight, b.bn1.bias)))
        out = F.batch_norm(F.conv2d(inner, b.conv2.weight, padding=1), b.bn2.running_mean, b.bn2.running_var,
                           b.bn2.weight, b.bn2.bias)
        if len(b.shortcut):
            conv, bn = b.shortcut
            h = F.batch_norm(F.conv2d(h, conv.weight, stride=conv.stride), bn.running_mean, bn.running_var,
                             bn.weight, bn.bias)
        return dropped(F.relu(out + h))

    with torch.no_grad():
        h = dropped(F.relu(F.conv2d(x, model.stem[0].weight, model.stem[0].bias, padding=1)))
        expected = F.linear(block(model.block2, block(model.block1, h)).mean((2, 3)), model.head.weight,
                            model.head.bias)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, model(x))


def test_ensemble_members_differ_on_a_lone_head(tmp_path):
    """On frozen features the head is the only layer: its input features take the dropout, so the
    members are not copies of the final model (the score is not members × the plain norm)."""
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 3
    np.save(tmp_path / "e.npy", (rng.normal(size=(3, 16))[labels] + rng.normal(size=(40, 16))).astype(np.float32))
    data = Dataset(np.zeros((40, 4, 4), np.uint8), labels.astype(np.int64), ("a", "b", "c"))
    config = TrainConfig(embeddings=str(tmp_path / "e.npy"), epochs=2, checkpoints=2)
    settings = {"tracin-ensemble": scorer_class("tracin-ensemble").Settings(members=1)}
    one = score_methods(data, ["tracin-ensemble"], config=config, settings=settings).results["tracin-ensemble"]
    for last_layer_only in (False, True):
        settings = {"tracin-ensemble": scorer_class("tracin-ensemble").Settings(
            members=3, max_dropout=0.3, last_layer_only=last_layer_only)}
        three = score_methods(data, ["tracin-ensemble"], config=config, settings=settings).results["tracin-ensemble"]
        assert three.info["dropped"] == "the head's input features"
        assert np.abs(three.scores - 3 * one.scores).max() > 1e-3 * np.abs(one.scores).max()


def test_dropout_member_zeroes_weights_at_the_rate_and_leaves_the_model_alone():
    model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.BatchNorm1d(100))
    before = model[0].weight.detach().clone()
    member = dropout_member(model, 0.3, torch.Generator().manual_seed(0))
    zeroed = (member[0].weight == 0).float().mean().item()
    assert 0.28 < zeroed < 0.32
    assert torch.equal(model[0].weight, before) and torch.equal(member[0].bias, model[0].bias)
    assert torch.equal(member[1].weight, model[1].weight)


def test_bad_settings_are_refused(tiny):
    dataset, trained = tiny
    with pytest.raises(OptionError, match="norm_method"):
        _score("tracin", dataset, trained, norm_method="fast")
    with pytest.raises(OptionError, match="members"):
        _score("tracin-ensemble", dataset, trained, members=0)
    with pytest.raises(OptionError, match="activation, weights"):
        _score("tracin-ensemble", dataset, trained, dropout="inputs")


@pytest.mark.parametrize("name", ["tracin-last", "tracin"])
def test_planted_noise_on_sample_digits_ranks_flips_first(name):
    # Digits with 20% symmetric flips, 5 epochs, 3 checkpoints. Measured AUROC over noise/training
    # seeds 0-4: tracin-last 0.92-0.99, tracin 0.91-0.99 (loss at θ* 0.997-0.999); random ranking
    # gives 0.5, a misaligned or sign-flipped score ≤ 0.5. The floor 0.85 sits below the worst seed.
    noisy = with_injected_noise(load_dataset("sample"), rate=0.2, seed=0)
    run = score_methods(noisy.dataset, [name], config=TrainConfig(epochs=5, checkpoints=3, device="cpu"))
    assert detection_metrics(run.results[name].scores, noisy.flipped)["auroc"] > 0.85
