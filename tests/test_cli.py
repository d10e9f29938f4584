"""The command line as a user runs it: a subprocess, its files, its stdout and its exit status."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import last_json_line, run_cli

from engine.config import TrainConfig
from engine.data import load_dataset, load_sample, save_npz
from engine.pipeline import read_decisions, retrain_comparison, with_injected_noise
from engine.scorers import available_methods

COLUMNS = ["index", "score", "rank", "given_label", "predicted_label", "suggested_label", "is_flipped"]


def test_methods_prints_one_name_per_line():
    result = run_cli("methods")
    assert result.returncode == 0, result.stderr
    names = result.stdout.splitlines()
    assert names == available_methods()
    assert {"loss", "margin", "cleanlab"} <= set(names)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    out = tmp_path_factory.mktemp("score") / "scores.csv"
    result = run_cli("score", "sample", "--method", "loss", "--noise-rate", "0.2", "--out", out, "--epochs", "3")
    return result, out


def test_score_writes_the_documented_csv(scored):
    result, out = scored
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out)
    assert list(table.columns) == COLUMNS
    train = load_sample("train")
    assert len(table) == len(train)
    assert sorted(table["index"]) == sorted(train.index)  # every sample, by its stable index
    np.testing.assert_array_equal(table["rank"], np.arange(1, len(train) + 1))  # most suspicious first
    assert table["score"].is_monotonic_decreasing
    noisy = with_injected_noise(train, rate=0.2, seed=0)  # the CLI's --seed defaults to 0
    truth = pd.DataFrame({"index": train.index, "given_label": noisy.dataset.labels,
                          "is_flipped": noisy.flipped.astype(int)})
    merged = table.merge(truth, on="index", suffixes=("", "_expected"))
    np.testing.assert_array_equal(merged["given_label"], merged["given_label_expected"])
    np.testing.assert_array_equal(merged["is_flipped"], merged["is_flipped_expected"])
    assert merged["is_flipped"].sum() == round(0.2 * len(train))


def test_score_ends_stdout_with_a_json_summary(scored):
    result, out = scored
    summary = last_json_line(result.stdout)
    assert summary["method"] == "loss" and summary["n"] == 1078 and summary["device"] == "cpu"
    assert summary["seconds"] > 0
    # 3 epochs on 20% symmetric noise: AUROC ~0.99 (tests/test_baselines.py has the measured floors).
    assert summary["auroc"] > 0.95 and 0 < summary["ap"] <= 1 and 0 < summary["precision_at_k"] <= 1
    assert "Traceback" not in result.stderr
    review = summary["review"]  # how deep to review, from θ*'s probabilities (loss stores none of its own)
    assert review["probabilities_from"].startswith("trained model") and 0 <= review["stop_depth"] <= 1078
    assert review["expected_label_errors"] == pytest.approx(1078 * review["expected_noise_rate"], abs=0.1)
    assert list(review["estimated_precision"]) == ["1%", "2%", "5%", "10%"]
    assert all(0 <= p <= 1 for p in review["estimated_precision"].values())


@pytest.fixture(scope="module")
def retrain_files(tmp_path_factory):
    """A 10%-noisy digits training set and decisions that drop 20 flipped rows and fix 30 more."""
    root = tmp_path_factory.mktemp("retrain")
    noisy = with_injected_noise(load_sample("train"), rate=0.1, seed=3)
    save_npz(noisy.dataset, root / "train.npz")
    flipped_index = noisy.dataset.index[noisy.flipped]
    clean_labels = dict(zip(noisy.dataset.index.tolist(), noisy.clean_labels.tolist(), strict=True))
    rows = [f"{i},drop," for i in flipped_index[:20]]
    rows += [f"{i},relabel,{clean_labels[i]}" for i in flipped_index[20:50]]
    rows += [f"{noisy.dataset.index[~noisy.flipped][0]},keep,"]
    (root / "decisions.csv").write_text("index,action,new_label\n" + "\n".join(rows) + "\n")
    return root


def test_retrain_reports_both_accuracies_and_the_counts(retrain_files):
    result = run_cli("retrain", retrain_files / "train.npz", "--decisions", retrain_files / "decisions.csv",
                     "--test", "sample:test", "--epochs", "3")
    assert result.returncode == 0, result.stderr
    summary = last_json_line(result.stdout)
    assert summary["n_dropped"] == 20 and summary["n_relabeled"] == 30
    # The same comparison through the engine: same seed and recipe, so the same accuracies
    # (up to one test digit of floating-point drift between processes).
    train_set = load_dataset(retrain_files / "train.npz")
    expected = retrain_comparison(train_set, read_decisions(str(retrain_files / "decisions.csv"), train_set),
                                  load_sample("test"), config=TrainConfig(epochs=3))
    for key in ("test_accuracy_before", "test_accuracy_after"):
        assert summary[key] == pytest.approx(expected[key], abs=1.5 / 360)
        assert summary[key] >= 0.85  # the small CNN reaches ~0.95 on the digits in 3 epochs


@pytest.mark.parametrize("module", ["engine", "engine.cli", "engine.pipeline"])
def test_importing_the_engine_does_not_import_streamlit(module):
    code = f"import sys, {module}; print('streamlit' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
