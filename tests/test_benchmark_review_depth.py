"""The review-depth benchmark: its measurement against brute force, and one quick run of the script."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))  # `benchmarks` is a folder of scripts, not an installed package

from benchmarks.review_depth import measure  # noqa: E402


def test_measure_compares_the_estimate_with_the_truth_along_the_ranking():
    n = 200
    is_noisy = np.zeros(n, dtype=bool)
    is_noisy[[0, 1, 2, 50, 120]] = True
    scores = -np.arange(n, dtype=float)  # row 0 is the most suspicious
    prob = np.where(is_noisy, 0.9, 0.05)
    exp = SimpleNamespace(is_noisy=is_noisy)
    row = measure(exp, scores, prob)
    assert row["true_total"] == 5 and row["true_rate"] == pytest.approx(0.025)
    assert row["true_p1%"] == 1.0 and row["true_p2%"] == 0.75 and row["true_p5%"] == 0.3 and row["true_p10%"] == 0.15
    assert row["est_total"] == pytest.approx(5 * 0.9 + 195 * 0.05)
    assert row["est_p2%"] == pytest.approx((3 * 0.9 + 0.05) / 4)
    # the reviewer decides the top 2% (4 rows) with the truth: 3 errors found, and those rows become certain
    assert row["reviewed"] == 4 and row["found"] == 3


@pytest.mark.slow
def test_quick_digits_run_estimates_the_noise_it_injected(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "review_depth.py"), "--setting", "digits-sym20",
               "--quick", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [line["kind"] for line in lines[:4]] == ["training", "detection", "detection", "detection"]
    review = [line for line in lines if line["kind"] == "review-depth"]
    assert {line["ranking"] for line in review} == {"fvm-loss", "cleanlab", "loss"}
    default = next(line for line in review if line["ranking"] == "fvm-loss" and line["source"].startswith("default"))
    assert "fvm-loss" in default["source"] and default["true_total"] == round(0.2 * 1078)
    assert 0.1 < default["est_rate"] < 0.3  # 20% injected
    assert default["true_p1%"] == 1.0 and default["est_p1%"] > 0.9
    assert default["found"] == default["reviewed"] == 22
    markdown = (tmp_path / "review-depth-quick.md").read_text()
    assert "--setting digits-sym20 --quick" in markdown and "| fvm-loss | default" in markdown


def test_unknown_setting_is_refused_with_the_valid_names(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "review_depth.py"), "--setting", "nonsense",
               "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 2 and "nonsense" in done.stderr and "digits-sym20" in done.stderr
    assert not list(tmp_path.iterdir())
