"""Influence and flat-validation scorers under chosen settings, on one trained model: the measurements
behind the defaults of ``if-*``, ``vm``, ``fvm`` and ``*-loss`` (benchmarks/detection.py runs every
method at its defaults; this one varies the settings).

    python benchmarks/influence_settings.py --noise-kind symmetric \\
        loss cleanlab if-last if-ekfac vm fvm vm:curvature=ekfac fvm:curvature=ekfac vm-loss fvm-loss

A variant is ``method[:key=value,...]``; ``finetune.key`` reaches the fine-tune recipe
(e.g. ``fvm:finetune.optimizer=lpf,finetune.gamma=0.003``). Data (``--data``): the embedded digits
(train = sample, validation = sample:val, trusted), or ``cifar``: the first 4,000 CIFAR-10 test
images as training rows and the next 1,000 as the trusted validation (../shared/data; a CPU-sized
check on harder data). Noise injected with seed 0, the default training recipe. Prints one
Markdown row per variant: AUROC, AP, precision at k = #flips, relabel top-1 on the flipped rows,
seconds, and θ̃'s validation accuracy where there is one.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.reports import add_results_arguments, results_file  # noqa: E402
from engine.config import TrainConfig  # noqa: E402
from engine.data import load_dataset, load_npz  # noqa: E402
from engine.metrics import detection_metrics  # noqa: E402
from engine.pipeline import with_injected_noise  # noqa: E402
from engine.scorers import ScoringContext, make_scorer, scorer_class  # noqa: E402
from engine.training import train  # noqa: E402


def variant_settings(spec: str):
    """``method:key=value,...`` → (method, its Settings with those changes)."""
    method, _, changes = spec.partition(":")
    settings = scorer_class(method).Settings()
    for change in filter(None, changes.split(",")):
        key, _, text = change.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if key.startswith("finetune."):
            settings = replace(settings, finetune=replace(settings.finetune, **{key[len("finetune."):]: value}))
        else:
            settings = replace(settings, **{key: value})
    return method, settings


TITLE = "Influence and flat-validation scorers under their settings"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--noise-kind", default="symmetric")
    parser.add_argument("--noise-rate", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=("digits", "cifar"), default="digits")
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    add_results_arguments(parser, append=True)
    args = parser.parse_args()
    with results_file(args, TITLE):
        torch.set_num_threads(1)
        variants = [(spec, *variant_settings(spec)) for spec in args.variants]  # bad specs fail before training
        if args.data == "cifar":
            cifar = load_npz(Path(args.data_root) / "cifar10_test_jpegq75.npz")
            base, validation = cifar.subset(np.arange(4000)), cifar.subset(np.arange(4000, 5000))
        else:
            base, validation = load_dataset("sample"), load_dataset("sample:val")
        noisy = with_injected_noise(base, rate=args.noise_rate, kind=args.noise_kind, seed=args.seed)
        trained = train(noisy.dataset, replace(TrainConfig(), seed=args.seed, device="cpu", threads=1))
        flipped = noisy.flipped
        print(f"{args.data}, {args.noise_kind} {args.noise_rate:.0%} noise, "
              f"{int(flipped.sum())} of {len(flipped)} flipped\n")
        print("| variant | AUROC | AP | P@k | relabel top-1 | seconds | θ̃ val. acc. |\n|---|---|---|---|---|---|---|")
        for spec, method, settings in variants:
            context = ScoringContext(noisy.dataset, trained, validation, validation_trusted=True)
            start = time.perf_counter()
            result = make_scorer(method, settings).run(context)
            seconds = time.perf_counter() - start
            metrics = detection_metrics(result.scores, flipped)
            relabel = (result.suggested_labels[flipped] == noisy.clean_labels[flipped]).mean()
            accuracy = result.info.get("validation_accuracy")
            print(f"| {spec} | {metrics['auroc']:.4f} | {metrics['ap']:.4f} | {metrics['precision_at_k']:.3f} | "
                  f"{relabel:.3f} | {seconds:.1f} | {'' if accuracy is None else f'{accuracy:.3f}'} |", flush=True)


if __name__ == "__main__":
    main()
