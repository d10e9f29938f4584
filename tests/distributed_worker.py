"""Launched by tests/test_distributed.py under ``torch.distributed.run``: train with DDP on a tiny
dataset whose global batches split unevenly across the ranks, check the collectives, and let rank 0
save the trained weights for the test to compare with single-process training."""

import sys

import numpy as np
import torch
from conftest import make_dataset

from engine.distributed import from_torchrun
from engine.training import TrainConfig, train

# 45 rows in batches of 7: parts of 3/4 (two ranks) or 2/2/3 (three), the last batch of 3 rows 1/2 or 1/1/1.
DATASET = dict(classes=3, per_class=15, seed=4)
CONFIG = TrainConfig(epochs=2, batch_size=7, checkpoints=2, device="cpu")

if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed = from_torchrun("cpu")
    trained = train(make_dataset(**DATASET), CONFIG, distributed=distributed)
    # gather_rows: each rank holds its shard of 10 rows; everyone gets all rows in order
    rows = np.arange(10.0)[distributed.shard(10)]
    np.testing.assert_array_equal(distributed.gather_rows(rows * 2, 10), np.arange(10.0) * 2)
    total = distributed.all_reduce_sum(torch.tensor([distributed.rank + 1.0]))
    assert float(total) == distributed.world_size * (distributed.world_size + 1) / 2
    if distributed.is_main:
        torch.save({"state": trained.model.state_dict(), "history": trained.history,
                    "checkpoints": [c.state for c in trained.checkpoints]}, sys.argv[1])
        # The trained model is a plain module again: a backward pass on one rank alone must not
        # wait for DDP's gradient all-reduce (it would hang), and its BatchNorm layers are plain.
        assert all(type(m).__name__ != "SyncBatchNorm2d" for m in trained.model.modules())
        x = trained.task.inputs(make_dataset(**DATASET).images[:4])
        trained.model.train()(x).sum().backward()
