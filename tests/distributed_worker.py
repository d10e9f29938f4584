"""Launched by tests/test_distributed.py under ``torch.distributed.run``: train with DDP on a tiny
dataset whose global batches split unevenly across the ranks, check the collectives, then score
every method of ``SCORED`` with the rows sharded across the ranks, on a model each rank trained
alone (the same seeded run everywhere, so the test compares the scoring with single-process
scoring of that very model). Rank 0 saves the DDP weights and the merged results."""

import sys

import numpy as np
import torch
from conftest import make_dataset
from torch import nn

from engine.config import TrainConfig
from engine.distributed import from_torchrun
from engine.finetune import FinetuneConfig
from engine.pipeline import score_methods, with_injected_noise
from engine.scorers import scorer_class
from engine.training import train

# 45 rows in batches of 7: parts of 3/4 (two ranks) or 2/2/3 (three), the last batch of 3 rows 1/2 or 1/1/1.
DATASET = dict(classes=3, per_class=15, seed=4)
CONFIG = TrainConfig(epochs=2, batch_size=7, checkpoints=2, device="cpu")
# Every kind of sharding: row-local scorers, curvature fitted on training-row shards (if-last, if-ekfac
# with sampled Fisher labels), fine-tunes with curvature fitted on validation-row shards (fvm with
# EK-FAC and the exact GGN, vm with the last layer), and cleanlab's folds spread over the ranks.
SCORED = ["loss", "tracin", "if-last", "if-ekfac", "fvm", "vm", "fvm-loss", "cleanlab"]
SETTINGS = {"fvm": scorer_class("fvm").Settings(finetune=FinetuneConfig(epochs=3), curvature="ekfac"),
            "vm": scorer_class("vm").Settings(finetune=FinetuneConfig(optimizer="sgd", epochs=3)),
            "fvm-loss": scorer_class("fvm-loss").Settings(finetune=FinetuneConfig(epochs=3))}


def scoring_data():
    """The noisy training rows and the trusted validation rows that ``SCORED`` is run on."""
    noisy = with_injected_noise(make_dataset(**DATASET), rate=0.2, seed=3).dataset
    return noisy, make_dataset(classes=3, per_class=6, seed=5)


def check_collectives(distributed) -> None:
    rows = np.arange(10.0)[distributed.shard(10)]  # each rank holds its shard of 10 rows
    np.testing.assert_array_equal(distributed.gather_rows(rows * 2, 10), np.arange(10.0) * 2)
    total = distributed.all_reduce_sum(torch.tensor([distributed.rank + 1.0]))
    assert float(total) == distributed.world_size * (distributed.world_size + 1) / 2
    ranks = [{"rank": r} for r in range(distributed.world_size)]
    assert distributed.gather_objects({"rank": distributed.rank}) == ranks
    layer = nn.BatchNorm1d(3)
    with torch.no_grad():
        layer.weight.fill_(distributed.rank + 2.0)
        layer.running_mean.fill_(distributed.rank - 1.0)
    distributed.broadcast_module(layer)
    assert layer.weight.eq(2.0).all() and layer.running_mean.eq(-1.0).all()


if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed = from_torchrun("cpu")
    trained = train(make_dataset(**DATASET), CONFIG, distributed=distributed)
    check_collectives(distributed)
    train_set, validation = scoring_data()
    run = score_methods(train_set, SCORED, validation=validation, trained=train(train_set, CONFIG),
                        settings=SETTINGS, distributed=distributed)
    if distributed.is_main:
        torch.save({"state": trained.model.state_dict(), "history": trained.history,
                    "checkpoints": [c.state for c in trained.checkpoints],
                    "results": {name: {"scores": r.scores, "suggested": r.suggested_labels, "info": r.info,
                                       "arrays": r.arrays} for name, r in run.results.items()}}, sys.argv[1])
        # The trained model is a plain module again: a backward pass on one rank alone must not
        # wait for DDP's gradient all-reduce (it would hang), and its BatchNorm layers are plain.
        assert all(type(m).__name__ != "SyncBatchNorm2d" for m in trained.model.modules())
        x = trained.task.inputs(make_dataset(**DATASET).images[:4])
        trained.model.train()(x).sum().backward()
