"""θ̃ and the scores taken there: the validation curvature at θ̃ against an autograd Hessian, one
fine-tune per run, LPF-SGD's perturbation and batch order, the reports of how close θ̃ is to a
minimum, the head curvature's switch to EK-FAC, and settings refused before any training."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_dataset

import engine.finetune as finetune_module
import engine.pipeline as pipeline
from engine.config import TrainConfig
from engine.data import Dataset
from engine.errors import OptionError
from engine.finetune import DEFAULT_RECIPE, RECIPES, FinetuneConfig, _descend, choose_recipe, finetune
from engine.guidance import scoring_advice
from engine.models import HEAD_MODEL, MODEL_NAMES, choose_model
from engine.pipeline import score_methods, with_injected_noise
from engine.scorers import ScoringContext, make_scorer, scorer_class
from engine.training import predict, train

TINY = TrainConfig(epochs=4, batch_size=16, device="cpu")


@pytest.fixture(scope="module")
def tiny():
    noisy = with_injected_noise(make_dataset(classes=3, per_class=20, seed=0), rate=0.2, seed=0)
    validation = make_dataset(classes=3, per_class=8, seed=1)
    return noisy.dataset, validation, train(noisy.dataset, TINY)


def _head_parameters(model):
    return torch.cat([model.head.weight.detach().flatten(1), model.head.bias.detach()[:, None]], 1).flatten()


def _head_loss(features, labels, theta, classes):
    w = theta.reshape(classes, -1)
    return F.cross_entropy(features @ w[:, :-1].T + w[:, -1], labels)


def test_fvm_is_the_damped_inverse_of_the_autograd_validation_hessian_at_the_finetuned_model(tiny):
    train_set, validation, trained = tiny
    settings = replace(scorer_class("fvm").Settings(), finetune=FinetuneConfig(epochs=3))
    scorer = make_scorer("fvm", settings)
    result = scorer.run(ScoringContext(train_set, trained, validation))
    tuned = scorer.finetuned.model.double()
    theta, classes = _head_parameters(tuned), trained.num_classes
    with torch.no_grad():
        val_features = tuned.features(trained.task.inputs(validation.images).double())
        train_features = tuned.features(trained.task.inputs(train_set.images).double())
    val_labels = torch.as_tensor(validation.labels)
    hessian = torch.autograd.functional.hessian(lambda t: _head_loss(val_features, val_labels, t, classes), theta)
    damping = 0.1 * float(hessian.diagonal().mean())  # DEFAULT_RELATIVE_DAMPING × the mean eigenvalue
    system = hessian + damping * torch.eye(len(theta), dtype=torch.float64)
    candidates = np.empty((len(train_set), classes))
    for i in range(len(train_set)):
        for c in range(classes):
            g = torch.autograd.grad(_head_loss(train_features[i:i + 1], torch.tensor([c]), theta.requires_grad_(),
                                               classes), theta)[0]
            candidates[i, c] = float(g @ torch.linalg.solve(system, g))
    np.testing.assert_allclose(result.scores, candidates[np.arange(len(train_set)), train_set.labels], rtol=1e-5)
    np.testing.assert_array_equal(result.suggested_labels, candidates.argmin(1))
    assert result.info["damping"] == pytest.approx(damping, rel=1e-6)
    # Not the curvature at θ*: the same brute force there gives other scores.
    star_model = copy.deepcopy(trained.model).double()
    with torch.no_grad():
        star_features = star_model.features(trained.task.inputs(validation.images).double())
    star = torch.autograd.functional.hessian(lambda t: _head_loss(star_features, val_labels, t, classes),
                                             _head_parameters(star_model))
    assert not torch.allclose(star, hessian, rtol=1e-3)


def test_vm_and_vm_loss_on_one_run_fine_tune_once(tiny, monkeypatch):
    train_set, validation, trained = tiny
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[2])
        return finetune(*args, **kwargs)

    monkeypatch.setattr("engine.scorers.flat_validation.finetune", counting)
    recipe = FinetuneConfig(optimizer="sgd", epochs=2)
    settings = {"vm": replace(scorer_class("vm").Settings(), finetune=recipe),
                "vm-loss": replace(scorer_class("vm-loss").Settings(), finetune=recipe)}
    run = score_methods(train_set, ["vm", "vm-loss"], validation=validation, trained=trained, settings=settings)
    assert calls == [recipe]
    assert run.results["vm"].info["validation_loss"] == run.results["vm-loss"].info["validation_loss"]
    np.testing.assert_array_equal(run.results["vm"].arrays["probabilities"],
                                  run.results["vm-loss"].arrays["probabilities"])


def test_bad_damping_fails_before_the_model_trains(tiny, monkeypatch):
    train_set, validation, _ = tiny

    def no_training(*args, **kwargs):
        raise AssertionError("the model was trained before the settings were checked")

    monkeypatch.setattr(pipeline, "train", no_training)
    for method in ("fvm", "if-last", "if-ekfac"):
        with pytest.raises(OptionError, match="damping"):
            score_methods(train_set, [method], validation=validation, config=TINY,
                          settings={method: replace(scorer_class(method).Settings(), damping=-1.0)})
    with pytest.raises(OptionError, match="optimizer"):
        score_methods(train_set, ["vm-loss"], validation=validation, config=TINY,
                      settings={"vm-loss": replace(scorer_class("vm-loss").Settings(),
                                                   finetune=FinetuneConfig(optimizer="adam"))})


def _batches_seen(trained, validation, optimizer):
    """The validation rows of every training forward pass of one fine-tune, in order."""
    model = trained.model_at(trained.checkpoints[-1])
    x = trained.task.inputs(validation.images)
    y = torch.as_tensor(validation.labels)
    row_of = {x[i].numpy().tobytes(): i for i in range(len(x))}
    seen = []

    def record(module, inputs):
        if torch.is_grad_enabled():
            rows = tuple(row_of[r.detach().numpy().tobytes()] for r in inputs[0])
            if not seen or seen[-1] != rows:  # SAM's two passes per step see one batch
                seen.append(rows)

    model.register_forward_pre_hook(record)
    config = FinetuneConfig(optimizer=optimizer, epochs=3, batch_size=5).with_recipe(trained.model_name)
    _descend(model, trained, x, y, config, lambda *a: None)
    return seen


def test_sgd_sam_and_lpf_see_the_same_batches_in_the_same_order(tiny):
    _, validation, trained = tiny
    order = _batches_seen(trained, validation, "sgd")
    assert len(order) == 3 * -(-len(validation) // 5)
    assert _batches_seen(trained, validation, "sam") == order
    assert _batches_seen(trained, validation, "lpf") == order


def test_lpf_perturbs_every_parameter_by_its_norm_one_dimensional_ones_too():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4))
    torch.nn.init.constant_(model[1].bias, 0.5)  # a zero vector has a zero norm, so no noise (as in the paper)
    params = [p for p in model.parameters()]
    before = [p.detach().clone() for p in params]
    shifts = {}

    def loss():
        for i, (p, b) in enumerate(zip(params, before, strict=True)):
            shifts[i] = (p.detach() - b).clone()
        return sum(p.sum() for p in params)

    config = FinetuneConfig(optimizer="lpf", gamma=0.1)
    finetune_module._perturbed_gradient(model, loss, config, torch.Generator().manual_seed(0))
    assert all(torch.allclose(p, b, atol=1e-6) for p, b in zip(params, before, strict=True))  # restored
    assert all(shift.abs().sum() > 0 for shift in shifts.values())  # conv weight, conv bias, BN weight and bias
    weight_shift = shifts[0].flatten(1)
    assert (weight_shift.std(1) / (0.1 * before[0].flatten(1).norm(dim=1))).sub(1).abs().max() < 0.7


@pytest.mark.parametrize(("model", "shape", "recipe"), [
    ("small-cnn", (8, 8), "small-cnn"),  # the sample digits: lr 0.01 overshoots there
    ("small-cnn", (28, 28), "small-cnn"),  # MNIST: not measured at 0.01
    ("small-cnn", (32, 32), "small-cnn"),  # grayscale, whatever its size
    ("small-cnn", (31, 40, 3), "small-cnn"),  # colour, one side under 32 px
    ("small-cnn", (32, 32, 3), "small-cnn-rgb32"),  # CIFAR-10 (flagship-variants.md)
    ("small-cnn", (64, 48, 3), "small-cnn-rgb32"),
    ("resnet18", (32, 32, 3), "resnet18"),
    ("timm:resnet50", (224, 224, 3), "resnet18"),  # no recipe of its own
    (HEAD_MODEL, (512,), "linear"),  # feature rows: the head alone has a recipe of its own
])
def test_the_recipe_follows_the_architecture_and_the_input(model, shape, recipe):
    assert choose_recipe(model, shape) == recipe


def test_every_network_the_trainer_builds_has_a_recipe_of_its_own_and_unknown_ones_fall_back():
    for name, shape in (("small-cnn", (8, 8)), ("resnet18", (32, 32, 3)), (HEAD_MODEL, (16,))):
        assert name in MODEL_NAMES + (HEAD_MODEL,)
        assert choose_recipe(name, shape) == name and name in RECIPES
    assert set(MODEL_NAMES) - {"auto"} | {HEAD_MODEL} <= {r.removesuffix("-rgb32") for r in RECIPES}
    assert choose_recipe("no-such-network", (512,)) == DEFAULT_RECIPE  # said in its why
    assert "any architecture without its own recipe" in RECIPES[DEFAULT_RECIPE].why


def test_a_head_on_frozen_features_fine_tunes_with_the_head_recipe(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    np.save(tmp_path / "e.npy", (rng.normal(size=(2, 6))[labels] + rng.normal(size=(40, 6))).astype(np.float32))
    data = Dataset(np.zeros((40, 4, 4), np.uint8), labels.astype(np.int64), ("a", "b"))
    train_set, validation = data.subset(np.arange(30)), data.subset(np.arange(30, 40))
    settings = {"vm-loss": replace(scorer_class("vm-loss").Settings(), finetune=FinetuneConfig(optimizer="sgd",
                                                                                               epochs=2))}
    run = score_methods(train_set, ["vm-loss"], validation=validation, settings=settings,
                        config=TrainConfig(embeddings=str(tmp_path / "e.npy"), epochs=2))
    info = run.results["vm-loss"].info
    assert run.trained.model_name == HEAD_MODEL and info["finetune_recipe"] == "linear"
    assert "own-model.md" in info["finetune_recipe_why"] and "not tuned" in info["finetune_recipe_why"]
    assert (info["finetune_epochs"], info["finetune_learning_rate"]) == (2, RECIPES["linear"].learning_rate)


def test_the_recipe_switches_where_a_gpu_run_switches_to_resnet18():
    shapes = [(8, 8), (32, 32), (31, 40, 3), (32, 32, 3), (64, 48, 3), (40, 40, 4), (512,)]
    for shape in shapes:
        resnet = choose_model(shape, torch.device("cuda")) == "resnet18"  # pure: no GPU needed
        assert resnet == (choose_recipe("small-cnn", shape) == "small-cnn-rgb32"), shape


def test_recipes_fill_only_the_unset_values():
    assert RECIPES["small-cnn-rgb32"].learning_rate > RECIPES["small-cnn"].learning_rate
    assert FinetuneConfig().with_recipe("resnet18").gamma == RECIPES["resnet18"].gamma
    assert FinetuneConfig().with_recipe("small-cnn-rgb32").learning_rate == RECIPES["small-cnn-rgb32"].learning_rate
    assert FinetuneConfig(epochs=7).with_recipe("resnet18").epochs == 7
    assert FinetuneConfig(learning_rate=0.05).with_recipe("small-cnn-rgb32").learning_rate == 0.05


@pytest.mark.parametrize(("shape", "explicit_rate", "recipe"), [
    ((8, 8), None, "small-cnn"), ((32, 32, 3), None, "small-cnn-rgb32"), ((32, 32, 3), 0.002, "small-cnn-rgb32")])
def test_the_scorer_fine_tunes_with_the_inputs_recipe_unless_the_settings_set_it(monkeypatch, shape, explicit_rate,
                                                                                  recipe):
    data = make_dataset(classes=2, per_class=4, shape=shape)
    trained = train(data, replace(TINY, epochs=1))
    rates = []  # the rate each fine-tune attempt starts from (before any backtracking)

    def descend(model, trained, x, y, config, progress):
        rates.append(config.learning_rate)
        return _descend(model, trained, x, y, config, progress)

    monkeypatch.setattr(finetune_module, "_descend", descend)
    settings = replace(scorer_class("vm-loss").Settings(),
                       finetune=FinetuneConfig(optimizer="sgd", epochs=1, learning_rate=explicit_rate))
    info = make_scorer("vm-loss", settings).run(ScoringContext(data, trained, data, validation_trusted=True)).info
    assert trained.model_name == "small-cnn" and info["finetune_recipe"] == recipe
    assert rates[0] == (explicit_rate or RECIPES[recipe].learning_rate)
    assert info["finetune_recipe_why"].startswith(RECIPES[recipe].why)
    assert ("learning_rate" in info["finetune_recipe_why"]) == (explicit_rate is not None)


def test_finetune_reports_the_heads_validation_gradient_at_the_finetuned_model(tiny):
    _, validation, trained = tiny
    tuned = finetune(trained, validation, FinetuneConfig(epochs=3))
    model = tuned.model
    loss = F.cross_entropy(model(trained.task.inputs(validation.images)), torch.as_tensor(validation.labels))
    grads = torch.autograd.grad(loss, [model.head.weight, model.head.bias])
    assert tuned.head_gradient_norm == pytest.approx(float(torch.sqrt(sum(g.square().sum() for g in grads))),
                                                     rel=1e-4)
    with_decay = [g + 5e-4 * p.detach() for g, p in zip(grads, [model.head.weight, model.head.bias], strict=True)]
    assert tuned.head_objective_gradient_norm == pytest.approx(
        float(torch.sqrt(sum(g.square().sum() for g in with_decay))), rel=1e-4)
    info = tuned.summary()
    assert info["head_gradient_norm"] == tuned.head_gradient_norm and info["head_gradient_norm_before"] > 0


def test_a_finetune_that_ends_worse_than_the_trained_model_is_said_in_the_info_and_the_warnings(tiny, monkeypatch):
    train_set, validation, trained = tiny

    def worse(*args, **kwargs):
        result = finetune(*args, **kwargs)
        return replace(result, validation_loss=result.initial_validation_loss + 0.5)

    monkeypatch.setattr("engine.scorers.flat_validation.finetune", worse)
    settings = replace(scorer_class("vm-loss").Settings(), finetune=FinetuneConfig(epochs=2))
    run = score_methods(train_set, ["vm-loss"], validation=validation, trained=trained, settings={"vm-loss": settings})
    info = run.results["vm-loss"].info
    assert info["finetune_worse_than_start"] is True and "not a validation minimum" in info["finetune_warning"]
    advice = scoring_advice(train_set, run.table("vm-loss"), validation=validation, trusted=True, info=info)
    assert "finetune-not-a-minimum" in [a.code for a in advice]


def test_if_last_switches_to_the_heads_ekfac_above_the_size_limit_and_says_so(tiny, monkeypatch):
    train_set, _, trained = tiny
    exact = make_scorer("if-last").run(ScoringContext(train_set, trained))
    assert exact.info["curvature"] == "last" and "curvature_note" not in exact.info
    monkeypatch.setattr("engine.curvature.MAX_EXACT_HEAD_DIM", 10)
    switched = make_scorer("if-last").run(ScoringContext(train_set, trained))
    assert switched.info["curvature"] == "ekfac-last" and "EK-FAC of the head" in switched.info["curvature_note"]
    preds = predict(trained.model, trained.task, train_set.images, trained.device)
    assert switched.info["curvature_dim"] == preds.logits.shape[1] * (preds.features.shape[1] + 1)
