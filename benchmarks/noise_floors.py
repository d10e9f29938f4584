"""Planted-noise AUROC on the sample digits for the methods the baselines' test does not cover, over
several noise seeds: the measurement behind the floors in ``tests/test_noise_floors.py``.

    python benchmarks/noise_floors.py --out benchmarks/results/noise_floors_cpu.md
    python benchmarks/noise_floors.py --seeds 3          # fewer seeds (the default is 5)

The setting of ``tests/test_baselines.py``: 20% planted noise (``symmetric`` and ``pair``) on the
digits' train split (N = 1078), small CNN, 3 epochs, CPU, one thread, training seed = noise seed;
the validation set is the digits' ``val`` split, trusted. One model is trained per (kind, seed) and
every method is scored on it (``engine.pipeline.score_methods``).

One JSON line per (kind, seed, method) on stdout: AUROC, AP, whether the most suspicious row is a
planted error (``top_is_planted``) and the scoring seconds; then a table of the worst and best AUROC
per method and kind over the seeds, and whether the most suspicious row was planted at every seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `benchmarks` importable

from benchmarks.reports import add_results_arguments, results_file  # noqa: E402
from engine.config import TrainConfig  # noqa: E402
from engine.data import load_sample  # noqa: E402
from engine.metrics import detection_metrics  # noqa: E402
from engine.pipeline import score_methods, with_injected_noise  # noqa: E402

METHODS = ("vm-loss", "fvm-loss", "if-last", "if-ekfac", "tracin-ensemble")
KINDS = ("symmetric", "pair")
RATE = 0.2


def config_for(seed: int) -> TrainConfig:
    """The recipe of one seed: the test's, with one thread so that every machine trains the same weights."""
    return TrainConfig(epochs=3, seed=seed, device="cpu", threads=1)


def measure(kind: str, seed: int, methods: list[str]) -> list[dict]:
    noisy = with_injected_noise(load_sample("train"), rate=RATE, kind=kind, seed=seed)
    start = time.perf_counter()
    run = score_methods(noisy.dataset, methods, validation=load_sample("val"), config=config_for(seed))
    total = time.perf_counter() - start
    rows = []
    for method in methods:
        result = run.results[method]
        metrics = detection_metrics(result.scores, noisy.flipped)
        rows.append({"kind": kind, "seed": seed, "method": method, "auroc": round(metrics["auroc"], 4),
                     "ap": round(metrics["ap"], 4),
                     "top_is_planted": bool(noisy.flipped[int(np.argmax(result.scores))]),
                     "score_seconds": round(result.timings.get("score_seconds", float("nan")), 1),
                     "train_seconds": round(run.train_seconds, 1), "run_seconds": round(total, 1)})
    return rows


def summary(rows: list[dict], methods: list[str]) -> list[str]:
    """Markdown table: worst / best AUROC per method and kind, and the top row planted at every seed."""
    lines = ["| method | kind | seeds | worst AUROC (seed) | best AUROC (seed) | top row planted at every seed |",
             "|---|---|---:|---:|---:|---|"]
    for method in methods:
        for kind in KINDS:
            mine = [r for r in rows if r["method"] == method and r["kind"] == kind]
            if not mine:
                continue
            worst, best = min(mine, key=lambda r: r["auroc"]), max(mine, key=lambda r: r["auroc"])
            planted = all(r["top_is_planted"] for r in mine)
            missed = [r["seed"] for r in mine if not r["top_is_planted"]]
            lines.append(f"| {method} | {kind} | {len(mine)} | {worst['auroc']:.4f} ({worst['seed']}) | "
                         f"{best['auroc']:.4f} ({best['seed']}) | "
                         f"{'yes' if planted else 'no (seeds ' + ', '.join(map(str, missed)) + ')'} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="noise seeds 0..K-1 (training seed = noise seed)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="methods to score")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="noise kinds")
    add_results_arguments(parser)
    args = parser.parse_args(argv)
    with results_file(args, "Planted-noise AUROC floors, sample digits, CPU"):
        rows = []
        for kind in args.kinds:
            for seed in range(args.seeds):
                for row in measure(kind, seed, args.methods):
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        print()
        print(f"20% planted noise on the digits' train split, small CNN, 3 epochs, CPU, 1 thread; "
              f"noise seeds 0-{args.seeds - 1} (training seed = noise seed); validation: the digits' val split, "
              f"trusted.")
        print()
        for line in summary(rows, args.methods):
            print(line)


if __name__ == "__main__":
    main()
