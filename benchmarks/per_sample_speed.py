"""Per-sample squared gradient norms: our hook path vs ``torch.func`` vmap(grad) vs a plain pass.

Prints one JSON line per measurement (samples/s, and the largest relative difference from the
vmap reference). Default: SmallCNN on 32×32 RGB, CPU, one thread::

    python benchmarks/per_sample_speed.py            # --model resnet18 --device cuda on a GPU
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from engine.device import resolve_device
from engine.models import build_model
from engine.per_sample import LayerCapture, per_sample_grad_sq_norms
from engine.task import ImageTask


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_pass(model, task, images, labels, device, batch_size):
    """One ordinary forward + backward of the mean loss per batch: the speed to aim at."""
    for lo in range(0, len(images), batch_size):
        x = task.inputs(images[lo:lo + batch_size], device)
        y = torch.as_tensor(labels[lo:lo + batch_size], device=device)
        model.zero_grad(set_to_none=True)
        task.loss(model(x), y).backward()


def vmap_norms(model, task, images, labels, device, batch_size):
    """The torch.func reference: every per-sample gradient materialized, then its squared norm."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p, x, y):
        logits = functional_call(model, (p, buffers), (x[None],))
        return task.loss(logits, y[None])

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    out = []
    for lo in range(0, len(images), batch_size):
        x = task.inputs(images[lo:lo + batch_size], device)
        y = torch.as_tensor(labels[lo:lo + batch_size], device=device)
        grads = per_sample(params, x, y)
        out.append(sum(g.flatten(1).square().sum(1) for g in grads.values()).double().cpu())
    return torch.cat(out).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small-cnn", choices=["small-cnn", "resnet18"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timed runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.samples, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.samples)
    task = ImageTask(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    torch.manual_seed(0)
    model = build_model(args.model, (32, 32, 3), 10, device).to(device).eval()

    runs = {
        "plain-forward-backward": lambda: plain_pass(model, task, images, labels, device, args.batch_size),
        "ours-auto": lambda: per_sample_grad_sq_norms(model, task, images, labels, device,
                                                      batch_size=args.batch_size),
        "ours-ghost": lambda: per_sample_grad_sq_norms(model, task, images, labels, device,
                                                       batch_size=args.batch_size, norm_method="ghost"),
        "ours-explicit": lambda: per_sample_grad_sq_norms(model, task, images, labels, device,
                                                          batch_size=args.batch_size, norm_method="explicit"),
        "torch.func-vmap-grad": lambda: vmap_norms(model, task, images, labels, device, args.batch_size),
    }
    # Round-robin repeats, best of each: load from other processes hits every method alike.
    results, best = {}, dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):
        for name, run in runs.items():
            _sync(device)
            start = time.perf_counter()
            results[name] = run()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    for name, seconds in best.items():
        print(json.dumps({"method": name, "model": args.model, "device": str(device), "threads": args.threads,
                          "samples": args.samples, "batch_size": args.batch_size, "seconds": round(seconds, 4),
                          "samples_per_s": round(args.samples / seconds, 1),
                          "ratio_to_plain": round(best["plain-forward-backward"] / seconds, 3)}), flush=True)
    with LayerCapture(model) as capture:  # the variants "auto" settled on, per layer
        x = task.inputs(images[:args.batch_size], device).requires_grad_(True)
        y = torch.as_tensor(labels[:args.batch_size], device=device)
        torch.autograd.grad(task.loss(model(x), y, reduction="sum"), x)
        names = {module: name for name, module in model.named_modules()}
        print(json.dumps({"auto_variants": {names[layer]: capture.variant(layer) for layer in capture.layers}}))
    reference = results["torch.func-vmap-grad"]
    for name in ("ours-auto", "ours-ghost", "ours-explicit"):
        rel = np.abs(results[name] - reference) / np.abs(reference)
        print(json.dumps({"check": name, "vs": "torch.func-vmap-grad", "max_rel_diff": float(rel.max())}))


if __name__ == "__main__":
    main()
