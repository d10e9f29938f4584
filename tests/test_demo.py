"""engine.demo: the "Why it works" numbers on the digits with tiny budgets, and the cache."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from engine import demo
from engine.config import TrainConfig
from engine.data import load_dataset, save_npz
from engine.demo import DemoSettings, cached_demo, filter_normalized_direction, load_demo_data, loss_along, run_demo
from engine.errors import DataError, OptionError
from engine.task import cross_entropy
from engine.training import predict, train

TINY = replace(DemoSettings().quick(), budgets=(1, 3), finetune_epochs=4, directions=2, depths=(0.5, 1.0), steps=5,
               top=6)


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    reports = []
    result = run_demo(TINY, folder, progress=lambda done, total, message: reports.append((done, total, message)))
    return folder, result, reports


@pytest.mark.slow
def test_one_auroc_per_budget_and_method_and_fvm_finds_the_flips(computed):
    _, result, _ = computed
    budgets = result.numbers["budgets"]
    assert budgets["epochs"] == list(TINY.budgets)
    assert set(budgets["auroc"]) == {"loss", "cleanlab", "fvm"}
    for values in budgets["auroc"].values():
        assert len(values) == len(TINY.budgets) and all(0.0 <= v <= 1.0 for v in values)
    assert len(budgets["memorized"]) == len(TINY.budgets) and all(0.0 <= m <= 1.0 for m in budgets["memorized"])
    assert budgets["auroc"]["fvm"][-1] > 0.9  # 20% symmetric noise on the digits: far above chance


@pytest.mark.slow
def test_landscape_curves_are_minima_at_the_centre(computed):
    _, result, _ = computed
    landscape = result.numbers["landscape"]
    assert landscape["alphas"] == pytest.approx(np.linspace(-TINY.radius, TINY.radius, TINY.steps).tolist())
    for optimizer in ("sgd", "sam"):
        curve = landscape["loss"][optimizer]
        assert len(curve) == TINY.steps and len(landscape["per_direction"][optimizer]) == TINY.directions
        assert curve == pytest.approx(np.mean(landscape["per_direction"][optimizer], axis=0).tolist())
        assert landscape["rise"][optimizer] > 0  # θ̃ is a minimum: half a filter norm away the loss is higher


@pytest.mark.slow
def test_top_rows_are_fvms_most_suspicious_with_their_images(computed):
    _, result, _ = computed
    data = load_demo_data(TINY)
    rows = result.numbers["top"]["rows"]
    assert len(rows) == TINY.top == len(result.images)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    positions = [r["position"] for r in rows]
    np.testing.assert_array_equal(result.images, data.noisy.images[positions])
    assert [r["given"] for r in rows] == data.noisy.labels[positions].tolist()
    assert [r["true"] for r in rows] == data.clean_labels[positions].tolist()
    assert result.numbers["top"]["flipped_in_top"] == int(data.flipped[positions].sum())


@pytest.mark.slow
def test_recovery_points_follow_the_depths(computed):
    _, result, _ = computed
    recovery = result.numbers["recovery"]
    flipped = result.numbers["data"]["flipped"]
    assert [p["k"] for p in recovery["points"]] == [round(f * flipped) for f in TINY.depths]
    for point in recovery["points"]:
        assert 0 <= point["relabeled_right"] <= point["relabeled"] <= point["k"]
        assert 0.0 <= point["accuracy"] <= 1.0
    assert 0.0 <= recovery["before"] <= 1.0 and 0.0 <= recovery["clean"] <= 1.0


@pytest.mark.slow
def test_progress_reaches_the_end(computed):
    _, _, reports = computed
    overall = [(done, total) for done, total, message in reports if message.startswith("demo:")]
    assert overall[-1][0] == overall[-1][1] == len(TINY.budgets) + 1 + len(TINY.depths) + 1
    assert any(message.startswith("now:") for _, _, message in reports)


@pytest.mark.slow
def test_a_second_call_reads_the_cache_without_computing(computed, monkeypatch):
    folder, result, _ = computed

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(demo, "compute_demo", refuse)
    again = run_demo(TINY, folder)
    assert again.from_cache and again.numbers == result.numbers
    np.testing.assert_array_equal(again.images, result.images)
    assert cached_demo(replace(TINY, seed=1), folder) is None  # other settings: not the same entry


def test_key_names_the_settings():
    assert DemoSettings().key() == DemoSettings().key()
    assert DemoSettings().key() != DemoSettings().quick().key()
    assert DemoSettings().key() != DemoSettings(noise_rate=0.3).key()


def test_bad_settings_are_refused():
    with pytest.raises(OptionError, match="steps"):
        DemoSettings(steps=20).validate()
    with pytest.raises(OptionError, match="budgets"):
        DemoSettings(budgets=()).validate()
    with pytest.raises(DataError, match="noise"):
        DemoSettings(noise_rate=0.0).validate()


def test_other_data_gets_a_clean_validation_and_test_set_carved_out(tmp_path):
    path = tmp_path / "digits.npz"
    save_npz(load_dataset("sample"), path)
    data = load_demo_data(DemoSettings(data=str(path)))
    parts = [data.noisy.index, data.validation.index, data.test.index]
    assert sum(map(len, parts)) == 1078 and len(np.unique(np.concatenate(parts))) == 1078
    original = load_dataset(str(path))
    for part in (data.validation, data.test):
        np.testing.assert_array_equal(part.labels, original.labels[np.searchsorted(original.index, part.index)])
    assert data.flipped.sum() == round(0.2 * len(data.noisy))


@pytest.fixture(scope="module")
def small_model():
    dataset = load_dataset("sample:val")
    return train(dataset, TrainConfig(epochs=1)), dataset


def test_direction_filters_have_the_models_filter_norms(small_model):
    trained, _ = small_model
    direction = filter_normalized_direction(trained.model, seed=3)
    for p, d in zip(trained.model.parameters(), direction, strict=True):
        assert d.shape == p.shape
        if p.ndim < 2:
            assert not d.any()
        else:
            torch.testing.assert_close(d.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1))
    again = filter_normalized_direction(trained.model, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(direction, again, strict=True))


def test_loss_along_matches_moving_the_weights_by_hand(small_model):
    trained, dataset = small_model
    direction = filter_normalized_direction(trained.model, seed=0)
    before = [p.detach().clone() for p in trained.model.parameters()]
    losses = loss_along(trained.model, trained, dataset, direction, np.array([0.0, 0.3]))
    assert all(torch.equal(a, p) for a, p in zip(before, trained.model.parameters(), strict=True))  # untouched
    at_zero = predict(trained.model, trained.task, dataset.images, trained.device).logits
    assert losses[0] == pytest.approx(cross_entropy(at_zero, dataset.labels).mean())
    moved = copy.deepcopy(trained.model)
    with torch.no_grad():
        for p, d in zip(moved.parameters(), direction, strict=True):
            p.add_(0.3 * d)
    by_hand = predict(moved, trained.task, dataset.images, trained.device).logits
    assert losses[1] == pytest.approx(cross_entropy(by_hand, dataset.labels).mean())


@pytest.mark.slow
def test_the_command_line_prints_the_cached_figures(computed, monkeypatch, capsys):
    folder, result, _ = computed
    monkeypatch.setattr(DemoSettings, "quick", lambda self: TINY)
    monkeypatch.setattr(demo, "compute_demo", lambda *a, **k: pytest.fail("the cache was not used"))
    assert demo.main(["--quick", "--folder", str(folder)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    budgets = result.numbers["budgets"]
    assert printed["auroc_by_epochs"] == {"epochs": budgets["epochs"], **budgets["auroc"]}
    assert printed["recovery"] == result.numbers["recovery"]


def budgets_measured(loss: list[float], fvm: list[float]) -> dict:
    return {"epochs": [2, 5][:len(loss)], "auroc": {"loss": loss, "cleanlab": [0.9] * len(loss), "fvm": fvm},
            "memorized": [0.01, 0.4][:len(loss)]}


def test_budget_story_says_the_loss_fails_only_when_its_auroc_falls():
    falls = demo.budget_story(budgets_measured([0.99, 0.90], [0.99, 0.995]))
    assert falls.loss_falls and falls.fvm_holds
    assert falls.headline == "Train longer, and the loss stops finding the errors; FVM does not"
    # the quick rehearsal of issue 12: loss AUROC 0.977 → 0.999 must not be told as a failure
    rises = demo.budget_story(budgets_measured([0.977, 0.999], [0.99, 0.998]))
    assert not rises.loss_falls and rises.fvm_holds
    assert "stops finding" not in rises.headline and "still finds the errors" in rises.headline
    assert "0.977 → **0.999**" in rises.text


def test_budget_story_does_not_claim_fvm_holds_when_it_falls_too():
    both = demo.budget_story(budgets_measured([0.99, 0.90], [0.99, 0.95]))
    assert both.loss_falls and not both.fvm_holds
    assert "FVM does not" not in both.headline


def test_landscape_story_calls_the_minimum_flat_only_when_sams_rose_less():
    landscape = {"alphas": [-0.5, 0.0, 0.5], "rise": {"sgd": 1.2, "sam": 0.4}}
    assert demo.landscape_story(landscape)[0].startswith("A flat validation minimum")
    sharper = demo.landscape_story({**landscape, "rise": {"sgd": 0.4, "sam": 1.2}})
    assert "not the flatter" in sharper[0] and "**0.40**, against **1.20**" in sharper[1]


def test_recovery_headline_follows_the_accuracies_shown():
    point = {"k": 10, "relabeled": 10, "relabeled_right": 9}
    assert demo.recovery_headline({"before": 0.9, "points": [{**point, "accuracy": 0.93}]}) == \
        "Fixing them pays back in accuracy"
    for after in (0.88, 0.9002):  # lower, or equal as shown (90.0%)
        assert "did not raise" in demo.recovery_headline({"before": 0.9, "points": [{**point, "accuracy": after}]})
