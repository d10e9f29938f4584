"""Speed and memory side by side, on one trained model and one data set: our ``tracin`` (whole network)
and ``fvm`` scoring, a plain forward+backward pass, ``torch.func`` per-sample gradients, Captum's
``TracInCP.self_influence`` and cleanlab's cross-validation; then the whole FVM pipeline's stages.

    python benchmarks/speed.py --quick    # CPU, SmallCNN, 1,024 CIFAR-10 images, 1 thread: < 2 min on 2 cores
    python benchmarks/speed.py            # GPU: ResNet-18 on the 50,000 CIFAR-10 training images
    python benchmarks/speed.py --data-root device_data   # where a GPU machine received the compact data

One JSON line per measurement on stdout, then a table. ``samples/s`` counts sample-gradients: TracIn
and Captum visit every row once per checkpoint, so theirs is rows × checkpoints / seconds, the rate
to set beside one plain pass. ``cost`` = plain pass rate / rate (1.0: as fast as a plain pass).
``peak MB``: the measurement's own peak above what was allocated before it. GPU:
``torch.cuda.max_memory_allocated``. CPU: the process's peak resident set, reset through
``/proc/self/clear_refs`` after ``malloc_trim``; memory the allocator still caches blurs it.
``memory`` = peak / the plain pass's peak (one batch's forward and backward: a training step
without the optimizer state).

The pipeline: quick mode times train → fine-tune → curvature → score for ``fvm`` on the sample
digits with the default recipe (goal ≤ 60 s); both modes also read the same stages off the CIFAR run
(full mode: goal ≤ 60 s after training).

Captum is the benchmark-only extra (``pip install -e ".[bench]"``); without it its rows are skipped.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `benchmarks` importable

from benchmarks.common import data_root, load_cifar10  # noqa: E402
from benchmarks.per_sample_speed import plain_pass, vmap_norms  # noqa: E402
from benchmarks.reports import add_results_arguments, results_file  # noqa: E402
from engine.config import PRESETS, TrainConfig  # noqa: E402
from engine.data import Dataset, load_sample  # noqa: E402
from engine.device import resolve_device  # noqa: E402
from engine.per_sample import per_sample_grad_sq_norms  # noqa: E402
from engine.pipeline import score_methods  # noqa: E402
from engine.scorers import ScoringContext, make_scorer, scorer_class  # noqa: E402
from engine.training import TrainedModel, train  # noqa: E402


@dataclass(frozen=True)
class Mode:
    """One benchmark setting: what is trained on which rows, and how many rows the slow rivals get."""

    config: TrainConfig
    train_rows: int
    validation_rows: int
    batch_size: int
    materializing_batch: int  # torch.func and Captum hold B × P per-sample gradients: ResNet-18 at 128 is 5.7 GB
    captum_rows: int  # Captum's sample-wise path
    per_example_rows: int  # Captum's per-example loop: slow, a few rows give its rate
    threads: int | None
    repeats: int  # best of this many runs for the measurements that take seconds (not fine-tunes, not CV)


MODES = {
    # 3 epochs / 3 checkpoints: enough for real checkpoints; the figures are rates, not accuracies.
    "quick": Mode(TrainConfig(model="small-cnn", epochs=3, checkpoints=3, device="cpu", threads=1), 1024, 128, 128, 128,
                  captum_rows=256, per_example_rows=16, threads=1, repeats=2),
    # The shared data README's GPU setting: ResNet-18, 12 epochs on the 50k CIFAR-10 training images.
    "full": Mode(PRESETS["full-gpu"], 50_000, 1000, 512, 128, captum_rows=10_000, per_example_rows=256, threads=None,
                 repeats=2),
    # benchmarks/gpu_check.sh --tiny: the same steps on a few hundred images, so the script cannot rot.
    "tiny": Mode(TrainConfig(model="small-cnn", epochs=2, checkpoints=2, device="cpu", threads=1), 256, 64, 64, 32,
                 captum_rows=64, per_example_rows=8, threads=1, repeats=1),
}


@dataclass
class Measurement:
    name: str
    rows: int
    passes: int  # per row: checkpoints for TracIn / Captum, 1 otherwise
    seconds: float
    peak_mb: float
    notes: dict

    @property
    def samples_per_s(self) -> float:
        return self.rows * self.passes / self.seconds


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))


def _rss_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key)) / 1024


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Yields a dict that receives ``peak_mb``: the block's peak memory above its starting level."""
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    _LIBC.malloc_trim(0)  # hand freed heap back first, so that reusing it counts as growth again
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak resident set (VmHWM) to the current one
    base = _rss_mb("VmRSS")
    yield out
    out["peak_mb"] = _rss_mb("VmHWM") - base


def measure(name: str, device: torch.device, rows: int, run: Callable[[], dict | None], *, passes: int = 1,
            plain: Measurement | None = None, repeats: int = 1) -> Measurement:
    """Time ``run`` (it may return notes): the best of ``repeats`` runs, the peak memory of the first
    (load from other processes only slows a run down); print its JSON line, return the measurement."""
    seconds, peaks = float("inf"), []
    for _ in range(repeats):
        with peak_memory(device) as memory:
            start = time.perf_counter()
            notes = run() or {}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = min(seconds, time.perf_counter() - start)
        peaks.append(memory["peak_mb"])
    result = Measurement(name, rows, passes, seconds, peaks[0], notes)
    line = {"measure": name, "rows": rows, "passes": passes, "repeats": repeats, "seconds": round(seconds, 3),
            "samples_per_s": round(result.samples_per_s, 1), "peak_mb": round(result.peak_mb, 1)}
    if plain is not None:
        line["cost_vs_plain"] = round(plain.samples_per_s / result.samples_per_s, 3)
        line["memory_vs_plain"] = round(result.peak_mb / max(plain.peak_mb, 1e-9), 3)
    print(json.dumps({**line, **notes}), flush=True)
    return result


def load_data(mode: Mode, root: str | None, seed: int = 0) -> tuple[Dataset, Dataset, str]:
    """CIFAR-10 training rows (a seeded sample in quick mode) and trusted validation rows from its test set."""
    folder = data_root(root)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(50_000, mode.train_rows, replace=False)) if mode.train_rows < 50_000 else None
    train_set = load_cifar10(folder, "train", rows=rows)
    validation = load_cifar10(folder, "test", rows=np.sort(rng.choice(10_000, mode.validation_rows, replace=False)))
    return train_set, validation, str(folder)


def captum_self_influence(trained: TrainedModel, x: torch.Tensor, y: torch.Tensor, batch_size: int, *,
                          sample_wise: bool) -> np.ndarray:
    """Captum's TracInCP self-influence over our checkpoints (η_t-weighted, every layer Captum covers).

    ``sample_wise``: Captum's per-batch hook path (Conv2d and Linear; BatchNorm's affine parameters are
    not covered); otherwise its per-example loop over every parameter.
    """
    from captum.influence import TracInCP
    from torch.utils.data import TensorDataset

    def load(model: torch.nn.Module, checkpoint) -> float:
        model.load_state_dict(checkpoint.state)
        model.eval()
        return checkpoint.step_weight

    loss = torch.nn.CrossEntropyLoss(reduction="sum" if sample_wise else "none")
    tracin = TracInCP(copy.deepcopy(trained.model), TensorDataset(x, y), trained.checkpoints, load, loss_fn=loss,
                      batch_size=batch_size, sample_wise_grads_per_batch=sample_wise)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Input Tensor 0 did not already require gradients"
        return tracin.self_influence().double().cpu().numpy()


def throughput(mode: Mode, train_set: Dataset, validation: Dataset, device: torch.device, *,
               cleanlab: bool = True) -> list[Measurement]:
    n, batch = len(train_set), mode.batch_size
    config = replace(mode.config, device=device.type)
    holder: dict = {}

    def run_training():
        holder["trained"] = train(train_set, config)
        return {"epochs": config.epochs, "model": holder["trained"].model_name}

    training = measure("training (engine, per epoch)", device, n, run_training, passes=config.epochs)
    trained = holder["trained"]
    checkpoints = len(trained.checkpoints)
    final = trained.model.eval()
    task = trained.task
    results = [training]
    plain = measure("plain forward+backward", device, n,
                    lambda: plain_pass(final, task, train_set.images, train_set.labels, device, batch),
                    repeats=mode.repeats)
    results.append(plain)
    context = ScoringContext(train_set, trained, validation)
    _ = context.predictions  # θ*'s forward pass: shared by every scorer, charged to none

    def scorer_run(name: str, settings=None) -> Callable[[], dict]:
        def run() -> dict:
            # A fresh context each run (θ*'s predictions kept): no fine-tune or curvature reused between rows.
            result = make_scorer(name, settings).run(replace(context, _computed={}))
            holder[f"{name}:{getattr(settings, 'curvature', '')}"] = result
            timings = {k: round(v, 3) for k, v in result.timings.items()}
            return {"timings": timings}
        return run

    tracin = replace(scorer_class("tracin").Settings(), batch_size=batch)
    results.append(measure("tracin (ours, all layers)", device, n, scorer_run("tracin", tracin), passes=checkpoints,
                           plain=plain, repeats=mode.repeats))
    fvm_settings = scorer_class("fvm").Settings()
    for curvature in ("last", "ekfac"):
        settings = replace(fvm_settings, curvature=curvature, batch_size=batch)
        whole = measure(f"fvm (ours, {curvature}): prepare + score", device, n, scorer_run("fvm", settings),
                        plain=plain)
        timings = holder[f"fvm:{curvature}"].timings
        # The scoring stage alone, as a rate over the training rows (prepare is per validation set).
        scoring = Measurement(f"fvm (ours, {curvature}): scoring", n, 1, timings["score_seconds"], whole.peak_mb,
                              {"prepare_seconds": round(timings["prepare_seconds"], 3),
                               "finetune_seconds": round(timings.get("finetune_seconds", 0.0), 3)})
        print(json.dumps({"measure": scoring.name, "rows": n, "seconds": round(scoring.seconds, 3),
                          "samples_per_s": round(scoring.samples_per_s, 1),
                          "cost_vs_plain": round(plain.samples_per_s / scoring.samples_per_s, 3),
                          **scoring.notes}), flush=True)
        results += [whole, scoring]

    def run_vmap():
        holder["vmap"] = vmap_norms(final, task, train_set.images, train_set.labels, device, mode.materializing_batch)

    results.append(measure("torch.func vmap(grad), final model", device, n, run_vmap, plain=plain,
                           repeats=mode.repeats))
    try:
        import captum  # noqa: F401
    except ImportError:
        print(json.dumps({"measure": "captum", "skipped": "captum is not installed (pip install -e '.[bench]')"}))
    else:
        x = task.inputs(train_set.images, device)
        y = torch.as_tensor(train_set.labels, device=device)
        for label, rows, sample_wise in (("sample-wise hooks, Conv2d+Linear", mode.captum_rows, True),
                                         ("per-example loop, all parameters", mode.per_example_rows, False)):
            rows = min(rows, n)

            def run_captum(rows=rows, sample_wise=sample_wise):
                holder[f"captum:{sample_wise}"] = captum_self_influence(trained, x[:rows], y[:rows],
                                                                        mode.materializing_batch,
                                                                        sample_wise=sample_wise)

            results.append(measure(f"Captum TracInCP.self_influence ({label})", device, rows, run_captum,
                                   passes=checkpoints, plain=plain, repeats=mode.repeats if sample_wise else 1))
        ours = holder["tracin:"].scores
        for key, what in (("captum:False", "all parameters"), ("captum:True", "Conv2d+Linear only")):
            theirs = holder[key]
            print(json.dumps({"check": f"tracin (ours) vs Captum TracInCP ({what})", "rows": len(theirs),
                              **compare(ours[:len(theirs)], theirs)}))
    if cleanlab:
        results.append(measure("cleanlab (5-fold cross-validation)", device, n, scorer_run("cleanlab"), plain=plain))
    ours = per_sample_grad_sq_norms(final, task, train_set.images, train_set.labels, device, batch_size=batch)
    print(json.dumps({"check": "per-sample norms (ours, final model) vs torch.func vmap(grad)",
                      **compare(ours, holder["vmap"])}))
    return results


def compare(ours: np.ndarray, reference: np.ndarray) -> dict:
    """Relative differences per row (max, median) and the largest one relative to the largest value:
    float32 rounding is relative to a row's own terms, so rows with tiny norms show large ratios."""
    diff = np.abs(ours - reference)
    relative = diff / np.abs(reference)
    return {"max_rel_diff": float(relative.max()), "median_rel_diff": float(np.median(relative)),
            "max_diff_over_max_value": float(diff.max() / np.abs(reference).max())}


def pipeline_on_sample(device: torch.device) -> dict:
    """train → fine-tune → curvature → score with ``fvm`` on the sample digits, the CLI's default recipe."""
    start, config = time.perf_counter(), TrainConfig(device=device.type)
    run = score_methods(load_sample("train"), ["fvm"], validation=load_sample("val"), config=config)
    return _stages(run.train_seconds, run.results["fvm"].timings, time.perf_counter() - start,
                   data=f"sample digits (1078 train, 359 val), {config.threads} training thread(s)")


def _stages(train_seconds: float, timings: dict, total: float, *, data: str) -> dict:
    finetune = timings.get("finetune_seconds", 0.0)
    return {"pipeline": "fvm", "data": data, "train_s": round(train_seconds, 2), "finetune_s": round(finetune, 2),
            "curvature_s": round(timings["prepare_seconds"] - finetune, 2),
            "score_s": round(timings["score_seconds"], 2), "total_s": round(total, 2),
            "after_training_s": round(timings["prepare_seconds"] + timings["score_seconds"], 2)}


def table(results: list[Measurement], plain: Measurement) -> str:
    lines = ["| measure | rows × passes | seconds | samples/s | cost vs plain | peak MB | memory vs plain |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in results:
        lines.append(f"| {m.name} | {m.rows} × {m.passes} | {m.seconds:.2f} | {m.samples_per_s:,.0f} | "
                     f"{plain.samples_per_s / m.samples_per_s:.2f} | {m.peak_mb:,.0f} | "
                     f"{m.peak_mb / max(plain.peak_mb, 1e-9):.2f} |")
    return "\n".join(lines)


TITLE = "Throughput of the scorers against a plain pass"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU, SmallCNN, 1,024 images (else: GPU, ResNet-18, 50k)")
    parser.add_argument("--tiny", action="store_true", help="CPU, SmallCNN, 256 images: a smoke run of every step")
    parser.add_argument("--skip-cleanlab", action="store_true", help="leave out cleanlab's cross-validation")
    parser.add_argument("--repeats", type=int, default=None, help="best of this many runs (default: the mode's)")
    parser.add_argument("--data-root", default=None, help="the shared data folder (default: see benchmarks/common.py)")
    parser.add_argument("--device", default=None, help="override the mode's device (cpu / cuda)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (quick mode: 1)")
    parser.add_argument("--skip-pipeline", action="store_true", help="leave out the sample-digits pipeline timing")
    add_results_arguments(parser)
    args = parser.parse_args()
    with results_file(args, TITLE):
        mode = MODES["tiny" if args.tiny else "quick" if args.quick else "full"]
        mode = replace(mode, repeats=args.repeats or mode.repeats)
        threads = args.threads or mode.threads
        if threads:
            torch.set_num_threads(threads)
        device = resolve_device(args.device or mode.config.device)
        started, cpu_started = time.perf_counter(), time.process_time()
        train_set, validation, folder = load_data(mode, args.data_root)
        print(json.dumps({"run": "python benchmarks/speed.py " + " ".join(sys.argv[1:]), "device": str(device),
                          "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                          "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "load_average": [round(v, 2) for v in os.getloadavg()], "torch": torch.__version__,
                          "data": f"CIFAR-10 train {len(train_set)} rows, validation {len(validation)} test rows "
                                  f"({folder})"}), flush=True)
        results = throughput(mode, train_set, validation, device, cleanlab=not args.skip_cleanlab)
        plain = next(m for m in results if m.name == "plain forward+backward")
        pipelines = []
        fvm_whole = next(m for m in results if m.name == "fvm (ours, last): prepare + score")
        training = results[0]
        pipelines.append(_stages(training.seconds, fvm_whole.notes["timings"], training.seconds + fvm_whole.seconds,
                                 data=f"CIFAR-10 {len(train_set)} rows, {mode.config.model}, "
                                      f"{mode.config.epochs} epochs"))
        if not args.skip_pipeline:
            pipelines.append(pipeline_on_sample(device))
        for line in pipelines:
            print(json.dumps(line), flush=True)
        # Wall time depends on what else runs; the process's CPU time is what an idle machine would need.
        print(json.dumps({"load_average_after": [round(v, 2) for v in os.getloadavg()],
                          "wall_seconds": round(time.perf_counter() - started, 1),
                          "cpu_seconds": round(time.process_time() - cpu_started, 1)}))
        print()
        print(table(results, plain))
        print()
        print("| pipeline (fvm) | train s | fine-tune s | curvature s | score s | after training s | total s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for p in pipelines:
            print(f"| {p['data']} | {p['train_s']} | {p['finetune_s']} | {p['curvature_s']} | {p['score_s']} | "
                  f"{p['after_training_s']} | {p['total_s']} |")


if __name__ == "__main__":
    main()
