"""The detection benchmark's data helpers against the shared data, and one smoke run of the script."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))  # `benchmarks` is a folder of scripts, not an installed package

from benchmarks.common import DEFAULT_ROOTS, known_errors, load_cifar10, load_label_errors, load_mnist_test  # noqa: E402
from benchmarks.detection import SIZES, build_experiment, recovery_methods  # noqa: E402

SHARED = next((root for root in DEFAULT_ROOTS if (root / "mnist_test.npz").is_file()), None)
needs_shared = pytest.mark.skipif(SHARED is None, reason="the shared data (../shared/data) is not here")


@needs_shared
def test_compact_cifar_test_decodes_to_the_npz_pixels():
    rows = np.array([0, 1, 777, 9999])
    compact = load_cifar10(SHARED, "test", rows=rows)
    full = load_cifar10(SHARED, "test")
    np.testing.assert_array_equal(compact.images, full.images[rows])
    np.testing.assert_array_equal(compact.labels, full.labels[rows])
    np.testing.assert_array_equal(compact.index, rows)
    assert compact.class_names == full.class_names and compact.image_shape == (32, 32, 3)


@needs_shared
def test_known_errors_follow_the_stable_index_after_subsetting():
    mnist = load_mnist_test(SHARED)
    table = load_label_errors(SHARED, "mnist")
    everything = known_errors(mnist, table)
    assert everything.is_error.sum() == 15
    error_rows = table.loc[table["is_label_error"] == 1, "index"].to_numpy()
    subset = mnist.subset(np.sort(np.concatenate([error_rows[:5], np.arange(20)])))
    errors = known_errors(subset, table)
    expected = set(error_rows[:5]) | (set(error_rows) & set(range(20)))
    assert set(subset.index[errors.is_error].tolist()) == expected
    correctable = table[(table["is_label_error"] == 1) & (table["category"] == "correctable")]
    for idx, guessed in zip(correctable["index"], correctable["guessed_label"], strict=True):
        assert everything.true_labels[idx] == guessed != mnist.labels[idx]
    unknown = everything.is_error & (everything.true_labels < 0)
    assert unknown.sum() == 15 - len(correctable)
    assert (everything.true_labels[~everything.is_error] == mnist.labels[~everything.is_error]).all()


@needs_shared
def test_trusted_real_setting_holds_out_clean_rows_and_scores_every_known_error():
    untrusted = build_experiment("mnist-real", SIZES["cpu"], lambda: SHARED, seed=0, device="cpu")
    exp = build_experiment("mnist-real-trusted", SIZES["cpu"], lambda: SHARED, seed=0, device="cpu")
    assert exp.validation_trusted and not untrusted.validation_trusted
    assert not np.isin(exp.validation.index, exp.train.index).any()  # held out: never trained on nor scored
    assert len(exp.train) + len(exp.validation) == 10_000
    assert 995 <= len(exp.validation) <= 1_000  # 10% of the 9,985 rows that are not known errors
    assert exp.is_noisy.sum() == 15  # every known error is among the scored rows, none in the validation set
    table = load_label_errors(SHARED, "mnist")
    assert not np.isin(exp.validation.index, table.loc[table["is_label_error"] == 1, "index"]).any()
    assert np.bincount(exp.validation.labels).min() >= 80  # stratified: about 100 per digit


def test_recovery_takes_loss_cleanlab_and_the_best_influence_methods():
    rows = [{"method": "loss", "auroc": 0.9}, {"method": "cleanlab", "auroc": 0.8}, {"method": "margin", "auroc": 0.99},
            {"method": "a", "auroc": 0.7}, {"method": "b", "auroc": 0.95}, {"method": "c", "auroc": 0.85},
            {"method": "broken", "error": "boom"}]
    assert recovery_methods(rows, None, 2) == ["loss", "cleanlab", "b", "c"]
    assert recovery_methods(rows, ["a", "broken"], 2) == ["a"]


@pytest.mark.slow
def test_quick_digits_run_writes_one_json_line_per_measurement_and_both_tables(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "detection.py"), "--setting", "digits-pair20",
               "--quick", "--methods", "loss,margin", "--recovery", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    kinds = [line["kind"] for line in lines]
    # training, two methods, then noisy baseline + 2 oracles + drop/relabel for loss (margin is no influence method)
    assert kinds == ["training", "detection", "detection"] + ["recovery"] * 5
    loss = next(line for line in lines if line["kind"] == "detection" and line["method"] == "loss")
    assert loss["n_noisy"] == round(0.2 * 1078) and loss["auroc"] > 0.8
    oracle = next(line for line in lines if line["method"] == "oracle" and line["action"] == "drop")
    assert oracle["flips_in_top_k"] == oracle["k"] == loss["n_noisy"]
    table = pd.read_csv(tmp_path / "digits-pair20-quick.csv")
    assert len(table) == len(lines)
    markdown = (tmp_path / "digits-pair20-quick.md").read_text()
    assert "--setting digits-pair20 --quick" in markdown and "| loss |" in markdown and "## Recovery" in markdown


def test_unknown_method_is_refused_with_the_valid_names(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "detection.py"), "--setting", "digits-sym20",
               "--methods", "nonsense", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 2 and "nonsense" in done.stderr and "loss" in done.stderr
    assert not list(tmp_path.iterdir())
