"""The trainer learns the digits, ignores row order, is seeded, and records the schedule's rates."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.config import TrainConfig
from engine.data import load_sample
from engine.errors import TrainingError
from engine.training import _make_schedule, evaluate, predict, train

CONFIG = TrainConfig(epochs=3, checkpoints=3, seed=0, device="cpu")


@pytest.fixture(scope="module")
def digits():
    return load_sample("train")


@pytest.fixture(scope="module")
def trained(digits):
    return train(digits, CONFIG)


def test_digits_reach_an_accuracy_floor(trained):
    # 3 epochs of the small CNN give 0.96 on the 360 test digits; 0.90 leaves room for BLAS noise.
    assert evaluate(trained, load_sample("test")) >= 0.90
    assert trained.history[-1]["accuracy"] > trained.history[0]["accuracy"]


def test_result_does_not_depend_on_row_order(digits, trained):
    """The trainer sorts rows by stable index, so a shuffled copy trains the same model."""
    shuffled = digits.subset(np.random.default_rng(1).permutation(len(digits)))
    again = train(shuffled, CONFIG)
    test = load_sample("test")
    first = predict(trained.model, trained.task, test.images, trained.device)
    second = predict(again.model, again.task, test.images, again.device)
    np.testing.assert_allclose(second.logits, first.logits, atol=1e-3)
    np.testing.assert_array_equal(second.predicted, first.predicted)


def test_same_seed_same_weights_other_seed_other_weights(digits, trained):
    again = train(digits, CONFIG)
    other = train(digits, replace(CONFIG, seed=1))
    for key, value in trained.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[key], value)
    assert not torch.allclose(other.model.head.weight, trained.model.head.weight)


def test_checkpoints_carry_the_schedule_learning_rates(digits, trained):
    """Each checkpoint's rate is the mean of the rates the scheduler set during its epoch."""
    steps = len(digits) // CONFIG.batch_size + (len(digits) % CONFIG.batch_size > 1)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=CONFIG.learning_rate)
    schedule = _make_schedule(optimizer, CONFIG, CONFIG.epochs * steps)
    rates = []
    for _ in range(CONFIG.epochs * steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    per_epoch = np.asarray(rates).reshape(CONFIG.epochs, steps).mean(axis=1)
    assert [c.epoch for c in trained.checkpoints] == [1, 2, 3]
    np.testing.assert_allclose([c.mean_learning_rate for c in trained.checkpoints], per_epoch, rtol=1e-12)
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]  # the schedule really moved
    final = trained.model_at(trained.checkpoints[-1])
    for key, value in trained.model.state_dict().items():
        torch.testing.assert_close(final.state_dict()[key], value)


def test_diverging_learning_rate_raises_a_clear_training_error(make_dataset):
    with pytest.raises(TrainingError, match=r"loss became \S+ in epoch \d even at learning rate 1e\+10 "
                                            r"\(tried 1e\+12, 1e\+11, 1e\+10\); lower the learning rate"):
        train(make_dataset(), replace(CONFIG, learning_rate=1e12))


def test_a_run_that_blows_up_starts_again_at_a_tenth_of_the_learning_rate(make_dataset):
    """At 30 the loss climbs past 100 × log(C); at 3 it stays finite and small: the run is kept, and says so."""
    data = make_dataset()
    trained = train(data, replace(CONFIG, learning_rate=30.0))
    assert trained.config.learning_rate == 3.0 and len(trained.notes) == 1
    assert re.fullmatch(r"the training loss became \S+ in epoch \d at learning rate 30; started again at 3",
                        trained.notes[0])
    assert all(h["loss"] < 100 * np.log(data.num_classes) for h in trained.history)
    again = train(data, replace(CONFIG, learning_rate=3.0))  # the same as asking for 3 in the first place
    for key, value in trained.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[key], value)


def test_divergence_in_the_last_step_is_caught_when_the_model_is_used(make_dataset):
    """One step (18 rows, one batch): every loss seen was finite, but the weights it left are not usable."""
    data = make_dataset()
    trained = train(data, replace(CONFIG, epochs=1, learning_rate=1e12))
    with pytest.raises(TrainingError, match=r"outputs are NaN or infinite .*lower the learning rate"):
        predict(trained.model, trained.task, data.images, trained.device)
