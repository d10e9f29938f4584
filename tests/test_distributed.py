"""Distributed runs (torchrun, gloo, two CPU processes) give the single-process result.

The launches are real: ``python -m torch.distributed.run --nproc_per_node=K``, as a user types it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, last_json_line, make_dataset, run_cli
from distributed_worker import CONFIG, DATASET, SCORED, SETTINGS, scoring_data

from engine.distributed import LOCAL, Distributed
from engine.errors import DataError
from engine.pipeline import score_methods
from engine.scorers import ScoringContext
from engine.training import train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])}
COMMON = ("--epochs", "2", "--noise-rate", "0.2", "--seed", "3")


def torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               *map(str, args)]
    return subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_contiguous_shards_cover_every_row_once():
    for n, k in ((10, 3), (7, 2), (2, 3), (1078, 4)):
        parts = [np.arange(n)[Distributed(rank, k).shard(n)] for rank in range(k)]
        np.testing.assert_array_equal(np.concatenate(parts), np.arange(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert LOCAL.shard(5) == slice(None)


def test_a_rank_fits_curvature_on_its_shard_and_too_few_rows_are_refused():
    rows = make_dataset(classes=3, per_class=3)
    middle = ScoringContext(rows, trained=None, distributed=Distributed(1, 3)).fitting_shard(rows)
    np.testing.assert_array_equal(middle.index, rows.index[3:6])
    assert ScoringContext(rows, trained=None).fitting_shard(rows) is rows  # single-process: no copy
    with pytest.raises(DataError, match="9 rows cannot be shared among 10 ranks"):
        ScoringContext(rows, trained=None, distributed=Distributed(0, 10)).fitting_shard(rows)


@pytest.fixture(scope="module")
def single_process():
    """The worker's DDP training and sharded scoring, done in this one process."""
    train_set, validation = scoring_data()
    run = score_methods(train_set, SCORED, validation=validation, trained=train(train_set, CONFIG), settings=SETTINGS)
    return train(make_dataset(**DATASET), CONFIG), run.results


# Largest relative score difference allowed between sharded and single-process scoring of the same
# model: sums over rows added in another order (curvature, float32 per-sample gradients in other
# batches) move scores by ~1e-7, EK-FAC's float32 eigenbases by ~1e-5.
SCORE_RTOL = 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_train_and_score_as_one_process(tmp_path, ranks, single_process):
    """Global batches of 7 rows split 3/4 or 2/2/3 (and 1/2, 1/1/1 for the last one): synchronized
    BatchNorm and size-weighted losses make every parameter, buffer and checkpoint match. Then every
    method scores one shard of rows per rank, curvature statistics all-reduced (cleanlab: folds per
    rank), and the merged scores, suggestions and per-row arrays are the single-process ones."""
    out = tmp_path / "worker.pt"
    result = torchrun(ranks, "tests/distributed_worker.py", out)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = torch.load(out, weights_only=False)
    single, results = single_process
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(distributed["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert len(distributed["checkpoints"]) == len(single.checkpoints)
    for theirs, ours in zip(distributed["checkpoints"], single.checkpoints, strict=True):
        for name, value in ours.state.items():
            torch.testing.assert_close(theirs[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for theirs, ours in zip(distributed["history"], single.history, strict=True):
        assert theirs == pytest.approx(ours, rel=1e-6)

    for name, ours in results.items():
        theirs = distributed["results"][name]
        np.testing.assert_allclose(theirs["scores"], ours.scores, rtol=SCORE_RTOL, err_msg=name)
        np.testing.assert_array_equal(theirs["suggested"], ours.suggested_labels, err_msg=name)
        assert theirs["arrays"].keys() == ours.arrays.keys()
        for key, array in ours.arrays.items():
            np.testing.assert_allclose(theirs["arrays"][key], array, rtol=SCORE_RTOL, atol=1e-7, err_msg=name)
        assert theirs["info"]["distributed"]["ranks"] == ranks
        assert theirs["info"]["distributed"]["sharded"] == (name != "cleanlab"), name
    assert distributed["results"]["cleanlab"]["info"]["fold_ranks"] == [k % ranks for k in range(5)]
    fvm = distributed["results"]["fvm"]["info"]  # per-row rates merged over the shards, weighted by rows
    assert fvm["suggestions_agree_with_argmax"] == pytest.approx(results["fvm"].info["suggestions_agree_with_argmax"])


# Median relative score difference allowed. DDP training leaves θ* a float rounding (~1e-5) away from
# single-process training; EK-FAC's eigenbases and sampled Fisher labels amplify it to ~1e-4.
MEDIAN_TOLERANCE = {"if-ekfac": 1e-3}


@pytest.mark.slow
@pytest.mark.parametrize("method", MEDIAN_TOLERANCE)
def test_two_ranks_write_the_single_process_scores(tmp_path, method):
    """The whole launch, as a user types it: DDP training, sharded curvature and scoring, rank 0 writes."""
    single = run_cli("score", "sample", "--method", method, "--out", tmp_path / "single.csv", *COMMON)
    assert single.returncode == 0, single.stderr[-3000:]
    result = torchrun(2, "-m", "engine.cli", "score", "sample", "--method", method, "--out", tmp_path / "dist.csv",
                      "--distributed", *COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.strip().splitlines()) == 1  # rank 0 alone prints the summary
    summary = last_json_line(result.stdout)
    assert summary["info"]["distributed"] == {"ranks": 2, "sharded": True}
    ours = pd.read_csv(tmp_path / "single.csv").set_index("index").sort_index()
    theirs = pd.read_csv(tmp_path / "dist.csv").set_index("index").sort_index()
    assert list(theirs.columns) == list(ours.columns)
    np.testing.assert_array_equal(theirs.index, ours.index)
    np.testing.assert_array_equal(theirs["given_label"], ours["given_label"])
    np.testing.assert_array_equal(theirs["is_flipped"], ours["is_flipped"])
    relative = np.abs(theirs["score"] - ours["score"]) / np.maximum(np.abs(ours["score"]), 1e-12)
    assert np.median(relative) < MEDIAN_TOLERANCE[method], relative.describe()
    assert relative.max() < 50 * MEDIAN_TOLERANCE[method], relative.describe()  # a row at a ReLU kink moves more
    assert (theirs["predicted_label"] == ours["predicted_label"]).mean() > 0.99
    assert (theirs["suggested_label"] == ours["suggested_label"]).mean() > 0.99


def test_distributed_outside_torchrun_says_how_to_start_it(tmp_path):
    result = run_cli("score", "sample", "--method", "loss", "--distributed", "--out", tmp_path / "scores.csv")
    assert result.returncode == 2
    assert not (tmp_path / "scores.csv").exists()
    assert "torchrun --nproc_per_node" in result.stderr


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL: one GPU per rank)")
def test_two_gpus_write_the_one_gpu_scores(tmp_path):
    """NCCL, nn.SyncBatchNorm, bf16 autocast: rounding differs more than on the CPU, the ranking must not."""
    args = ("score", "sample", "--method", "tracin", "--device", "cuda", *COMMON)
    single = run_cli(*args, "--out", tmp_path / "single.csv")
    assert single.returncode == 0, single.stderr[-3000:]
    result = torchrun(2, "-m", "engine.cli", *args, "--out", tmp_path / "dist.csv", "--distributed")
    assert result.returncode == 0, result.stderr[-3000:]
    ours = pd.read_csv(tmp_path / "single.csv").set_index("index").sort_index()
    theirs = pd.read_csv(tmp_path / "dist.csv").set_index("index").sort_index()
    assert theirs["score"].corr(ours["score"], method="spearman") > 0.99
    assert (theirs["predicted_label"] == ours["predicted_label"]).mean() > 0.98
