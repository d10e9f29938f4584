"""Scoring across processes and machines with PyTorch's own runtime, started by ``torchrun``.

    torchrun --nproc_per_node=K -m engine.cli score TRAIN --method M --distributed

Every rank loads the same data and runs the same seeded code; only three things are split:

* **Training** (:func:`engine.training.train` with ``distributed=``): each global batch of the
  single-process trainer (the same seeded permutation over the canonical order, the same
  augmentation draws) is cut into K contiguous parts, one per rank. The model is wrapped in
  ``DistributedDataParallel`` (gradients averaged over ranks), its BatchNorm layers normalize with
  the statistics of the whole global batch (``nn.SyncBatchNorm`` on GPUs; on the CPU, where PyTorch
  does not implement it, :class:`SyncBatchNorm2d`: the same per-channel sums all-reduced through
  gloo, autograd included), and each rank's loss is its summed loss × K / (global batch size), so
  the averaged gradient is exactly the full batch's mean-loss gradient even when the parts differ in
  size. The trained model equals the single-process one up to float rounding (summation order).
* **Scoring** (:func:`engine.pipeline.score_methods` with ``distributed=``): θ*'s predictions on
  the training rows are computed one contiguous shard per rank and all-gathered. Every rank runs
  the scorer's ``prepare``; where it fits curvature (if-last, if-ekfac on the training rows; vm,
  fvm on the validation rows) each rank sums the statistics over its shard of the fitting rows
  (GGN sums, K-FAC covariances, eigenvalue corrections, counts) and :meth:`Distributed.all_reduce_sum`
  adds them up, so every rank holds the curvature of the whole set. A fine-tuned θ̃ (vm, fvm) is
  trained by every rank alike and rank 0's weights are broadcast (:meth:`Distributed.broadcast_module`),
  so the ranks agree bit for bit even where kernels are not deterministic. cleanlab trains its folds
  round-robin across the ranks and all-reduces the held-out probabilities. Then a scorer that is
  ``row_local`` or ``prepared_row_local`` (once prepared, a row's score depends only on that row)
  scores only its rank's shard; scores, suggestions and per-row arrays are all-gathered in row
  order. Any other scorer scores every row on every rank (the same result everywhere) and says so
  in its ``info["distributed"]``.
* **Output**: only rank 0 (:attr:`Distributed.is_main`) writes the CSV and prints the JSON line.

Single-process, every method here is the identity, so the engine's code paths do not branch.
Backends: NCCL with one GPU per rank (``LOCAL_RANK``), gloo on the CPU.
"""

from __future__ import annotations

import atexit
import copy
import os
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from engine.device import resolve_device
from engine.errors import InfluenceLensError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Distributed:
    """This process's place among the ranks; the default is a single process (every method a no-op).

    ``device`` is where collectives run: the rank's GPU under NCCL, the CPU under gloo.
    ``batchnorm_group``: a process group of its own for BatchNorm statistics, so their all-reduces
    never interleave with DDP's asynchronous gradient buckets.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    batchnorm_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def bounds(self, n: int) -> np.ndarray:
        """K + 1 boundaries cutting ``n`` rows into contiguous parts whose sizes differ by at most one."""
        return np.array([n * r // self.world_size for r in range(self.world_size + 1)])

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of ``n`` rows (all of them single-process)."""
        if self.world_size == 1:
            return slice(None)
        bounds = self.bounds(n)
        return slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (a new tensor on ``tensor``'s device); the tensor itself single-process."""
        if self.world_size == 1:
            return tensor
        total = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(total)
        return total.to(tensor.device)

    def broadcast_module(self, module: nn.Module) -> None:
        """Overwrite ``module``'s parameters and buffers, in place, with rank 0's on every rank."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for tensor in chain(module.parameters(), module.buffers()):
                value = tensor.detach().to(self.device, copy=True)
                dist.broadcast(value, src=0)
                tensor.copy_(value)

    def gather_objects(self, value: object) -> list:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def gather_rows(self, local: np.ndarray, n: int) -> np.ndarray:
        """Every rank's :meth:`shard` of an ``n``-row array, concatenated in row order, on every rank."""
        if self.world_size == 1:
            return local
        bounds = self.bounds(n)
        sizes = np.diff(bounds)
        if len(local) != sizes[self.rank]:
            raise ValueError(f"rank {self.rank} holds {len(local)} rows, its shard of {n} has {sizes[self.rank]}")
        values = torch.from_numpy(np.ascontiguousarray(local))
        padded = values.new_zeros((int(sizes.max()), *values.shape[1:]), device=self.device)
        padded[:len(values)] = values.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)  # all_gather needs equal sizes: shards are padded to the largest
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]).cpu().numpy()

    def training_module(self, model: nn.Module) -> nn.Module:
        """What the trainer calls: ``model`` single-process, else DDP over a copy of it that shares its
        parameters and buffers (so ``model`` itself is trained) with BatchNorm synchronized."""
        if self.world_size == 1:
            return model
        synced = _with_synced_batchnorm(model, self.batchnorm_group, self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(synced, device_ids=device_ids)

    def batch_loss(self, loss_fn, logits: torch.Tensor, labels: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The loss to back-propagate on this rank's part of a global batch of ``batch_size`` rows.

        Single-process: the mean loss. Otherwise the part's summed loss × K / ``batch_size``, so DDP's
        average over K ranks is the global batch's mean-loss gradient whatever the part sizes.
        """
        if self.world_size == 1:
            return loss_fn(logits, labels)
        return loss_fn(logits, labels, reduction="sum") * (self.world_size / batch_size)


LOCAL = Distributed()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks with autograd: the gradient of every rank's input is the sum of the output gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllReduceSum.apply(grad, ctx.group), None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d normalizing with the statistics of the whole global batch across ranks.

    For the CPU (gloo), where ``nn.SyncBatchNorm`` is not implemented. Per-channel sums of x, then of
    (x − mean)², go through autograd-aware all-reduces (two passes, as precise as the local layer);
    in eval mode it is a plain BatchNorm2d.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: dist.ProcessGroup | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        group = self.process_group or dist.group.WORLD
        count = x.new_tensor([x.numel() // x.shape[1]])
        sums = _AllReduceSum.apply(torch.cat([x.sum((0, 2, 3)), count]), group)
        n = sums[-1]
        mean = sums[:-1] / n
        centered = x - mean[None, :, None, None]
        var = _AllReduceSum.apply(centered.square().sum((0, 2, 3)), group) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                self.running_var.mul_(1 - factor).add_(var * n / (n - 1).clamp(min=1), alpha=factor)
        out = centered * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out


def _with_synced_batchnorm(model: nn.Module, group: dist.ProcessGroup | None, device: torch.device) -> nn.Module:
    """A copy of the module tree sharing ``model``'s parameters and buffers, BatchNorm2d synchronized."""
    shared = {id(t): t for t in chain(model.parameters(), model.buffers())}
    synced = copy.deepcopy(model, memo=shared)
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(synced, group)
    for parent in list(synced.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                replacement = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                              child.track_running_stats, process_group=group)
                for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                    setattr(replacement, key, getattr(child, key))  # the very same tensors
                replacement.train(child.training)
                setattr(parent, name, replacement)
    return synced


def _leave_process_group() -> None:
    """Wait for every rank before tearing down: a rank that leaves while rank 0 still writes its
    output can make gloo abort the other process.

    Under gloo the wait is ``monitored_barrier`` (send/receive in this thread), not ``barrier``:
    gloo's barrier holds on to the collectives still in flight before it (their tensors are Python
    objects) and a worker thread drops them after the barrier returns, needing the GIL while the
    interpreter is already shutting down; the thread is then killed inside a destructor, which
    aborts the process ("terminate called without an active exception", seen in a core dump).
    """
    if dist.get_backend() == "gloo":
        dist.monitored_barrier()
    else:
        dist.barrier()
    dist.destroy_process_group()


def from_torchrun(device_name: str = "auto") -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment (destroyed at exit).

    The device: the rank's own GPU (``LOCAL_RANK``) with NCCL when ``device_name`` resolves to CUDA,
    else the CPU with gloo.
    """
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise InfluenceLensError(f"--distributed runs under torchrun, which sets {', '.join(missing)}; start it "
                                 "with: torchrun --nproc_per_node=K -m engine.cli score ... --distributed")
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave_process_group)
    return Distributed(dist.get_rank(), dist.get_world_size(), device, dist.new_group())
