"""How close the set-up page's time estimate (:func:`engine.preflight.estimate_run_time`) comes to the
real thing: the estimate, then the training (and, for the digits, scoring ``loss`` + ``cleanlab``,
whose K folds are the costly part) on the same data, timed.

    python benchmarks/time_estimate.py          # CPU, 1 thread: ~2 min on 2 busy cores

One JSON line per case on stdout, then a table (``ratio`` = estimate / measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `benchmarks` importable

from benchmarks.common import data_root, load_cifar10, load_mnist_test  # noqa: E402
from benchmarks.reports import add_results_arguments, results_file  # noqa: E402
from engine.config import PRESETS  # noqa: E402
from engine.data import load_sample  # noqa: E402
from engine.pipeline import score_methods  # noqa: E402
from engine.preflight import estimate_run_time  # noqa: E402
from engine.training import train  # noqa: E402


def measure(name: str, dataset, config, methods: list[str]) -> dict:
    start = time.perf_counter()
    estimate = estimate_run_time(len(dataset), dataset.image_shape, dataset.num_classes, config, methods)
    probe = time.perf_counter() - start
    start = time.perf_counter()
    if methods:
        score_methods(dataset, methods, config=config)
    else:
        train(dataset, config)
    measured = time.perf_counter() - start
    predicted = estimate.total_seconds
    return {"case": name, "rows": len(dataset), "shape": list(dataset.image_shape), "epochs": config.epochs,
            "methods": methods or ["(training only)"], "model": estimate.model,
            "images_per_s": round(estimate.images_per_second, 1), "probe_seconds": round(probe, 2),
            "estimate_seconds": round(predicted, 1), "measured_seconds": round(measured, 1),
            "ratio": round(predicted / measured, 3)}


TITLE = "The set-up page's time estimate against real runs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None)
    add_results_arguments(parser)
    args = parser.parse_args()
    with results_file(args, TITLE):
        torch.set_num_threads(1)
        root = data_root(args.data_root)
        fast = PRESETS["fast-cpu"]
        digits = load_sample("train")
        mnist = load_mnist_test(root)
        cifar = load_cifar10(root, "test")
        cases = [("digits 8×8", digits, fast, []),
                 ("digits 8×8, loss + cleanlab", digits, replace(fast, epochs=5), ["loss", "cleanlab"]),
                 ("MNIST test 28×28 (3,000 rows)", mnist.subset(mnist.index < 3000), replace(fast, epochs=2), []),
                 ("CIFAR-10 test 32×32 RGB (2,000 rows)", cifar.subset(cifar.index < 2000), replace(fast, epochs=3),
                  [])]
        rows = []
        for case in cases:
            rows.append(measure(*case))
            print(json.dumps(rows[-1]), flush=True)
        print("\n| case | methods | epochs | estimate s | measured s | ratio |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['case']} | {', '.join(r['methods'])} | {r['epochs']} | {r['estimate_seconds']} | "
                  f"{r['measured_seconds']} | {r['ratio']} |")


if __name__ == "__main__":
    main()
