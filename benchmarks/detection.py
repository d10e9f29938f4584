"""Detection, side by side: every registered scoring method on the same trained model and data.

    python benchmarks/detection.py --setting all --recovery            # the CPU tables in benchmarks/results/
    python benchmarks/detection.py --setting digits-sym20 --quick      # a smoke run, written to benchmarks/out/
    python benchmarks/detection.py --setting cifar-sym20 --size gpu --recovery   # 50k CIFAR-10, ResNet-18
    python benchmarks/detection.py --summary-only   # summary.md/.json (+ engine/measured_methods.json) again

Settings (``--setting``, repeatable, or ``all``):
- ``mnist-real`` / ``cifar-real``: the MNIST / CIFAR-10 test set with its labels as given, against the
  15 / 54 human-validated label errors (../shared/data); every row is trained on and scored. Methods
  that require validation get a 10% stratified carve-out of the same rows (``carve_validation``): it
  carries the given labels, so it is reported as *untrusted*, and it overlaps the training rows.
- ``mnist-real-trusted`` / ``cifar-real-trusted``: the same test sets with a **trusted** validation set
  instead: a 10% stratified split of the rows that are not known errors is held out (never trained on
  nor scored); the other 90%, every known error among them, is trained on and scored.
- ``cifar-sym20`` / ``cifar-pair20``: CIFAR-10 train with 20% symmetric / pair-flip noise; a clean
  validation split and a separate clean test split, both from the CIFAR-10 test set.
- ``digits-sym20`` / ``digits-pair20``: the embedded digits (val = sample:val, test = sample:test).

On a GPU machine the data travel in the git-ignored ``device_data/`` (58 MB; the CIFAR-10 test ``.npz``
is left behind, its compact form decodes to the same pixels)::

    mkdir -p device_data && cp -r ../shared/data/{mnist_test.npz,*.bin,*_index.npz,label_errors} device_data/

Sizes (``--size``; ``--quick`` is a smoke run, about a minute per setting) are in ``SIZES`` below.
Cost of the CPU size, measured on two cores shared with other jobs (load 2-7, one torch thread):
``--setting all --recovery`` with all 12 registered methods took 67 min wall, 37 min CPU. if-ekfac
is a third of it (7-9 min on each 10k real set), the four vm/fvm scorers 14 min (each repeats its
own fine-tune), cleanlab's cross-validation 12, recovery retraining 8, training 3. The real sets
must stay whole (10k rows, every known error), so for a quicker pass leave out the slow methods
with ``--methods`` or run only some settings (each is independent and seeded).

Every method runs through ``engine.pipeline.score_methods`` on one trained model (its own context,
so its seconds include its own forward passes); validation goes only to methods that require it.
Output: one JSON line per measurement on stdout; ``<out>/<setting>[-<size>].{csv,md}`` tables and
``<out>/summary.md``; progress bars on stderr.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `benchmarks` importable

from benchmarks.common import (  # noqa: E402
    REPO_ROOT,
    cell,
    cifar10_train_labels,
    comma_list,
    data_root,
    emit,
    known_errors,
    load_cifar10,
    load_label_errors,
    load_mnist_test,
    machine_description,
    markdown_table,
)
from engine.config import PRESETS, TrainConfig  # noqa: E402
from engine.data import Dataset, load_dataset, stratified_split  # noqa: E402
from engine.errors import InfluenceLensError, OptionError  # noqa: E402
from engine.measured import MEASURED_FILE  # noqa: E402
from engine.metrics import detection_metrics, top_k  # noqa: E402
from engine.pipeline import apply_decisions, carve_validation, score_methods, with_injected_noise  # noqa: E402
from engine.progress import Progress, tqdm_progress  # noqa: E402
from engine.scorers import ScoreResult, available_methods, scorer_class  # noqa: E402
from engine.training import TrainedModel, evaluate, train  # noqa: E402

SETTINGS = ("mnist-real", "cifar-real", "mnist-real-trusted", "cifar-real-trusted", "cifar-sym20", "cifar-pair20",
            "digits-sym20", "digits-pair20")
NOISE = {"sym20": ("symmetric", 0.2), "pair20": ("pair", 0.2)}
REAL_VALIDATION_FRACTION = 0.1  # 1,000 of 10,000: the size of the injected settings' clean validation
REAL_TOP_K = (100, 200, 500)
# Scores that are not influence estimates (the *-loss ones: the loss at the validation minimum θ̃):
# recovery always runs loss and cleanlab, then the best of the others.
NON_INFLUENCE = ("loss", "margin", "cleanlab", "vm-loss", "fvm-loss")
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
QUICK_OUT = REPO_ROOT / "benchmarks" / "out"  # git-ignored


@dataclass(frozen=True)
class Size:
    """Data sizes and the training recipe per data family for one machine size."""

    cifar_train: int | None  # CIFAR-10 train rows for the injected settings (None = all 50,000)
    real_rows: int | None  # rows kept from a real test set (None = all; fewer keeps every known error)
    validation: int  # clean validation rows from the CIFAR-10 test set (injected settings)
    test: int | None  # clean test rows from the rest of the CIFAR-10 test set (None = all the rest)
    recipes: dict[str, TrainConfig] = field(default_factory=dict)  # keys: mnist-real, cifar-real, cifar, digits


# CPU: one thread, small CNN, the trainer's defaults (batch 64, peak lr 0.05); epochs measured on these
# data: whole MNIST test, 6 epochs (the data README's reference recipe; 98.5% train accuracy, loss AUROC
# 0.98 against the 15 errors, ~45 s); CIFAR-10 test, 4 epochs (~58%: the small CNN stays weak on 10k
# CIFAR images, 12 epochs only move loss AUROC from 0.74 to 0.78 at three times the cost); 2,000 noisy
# CIFAR-10 train images, 10 epochs. Cleanlab's 5-fold cross-validation costs 4 more trainings.
_CPU = TrainConfig(model="small-cnn", threads=1)  # one training thread, as the committed tables ran
SIZES: dict[str, Size] = {
    # benchmarks/gpu_check.sh --tiny: a few hundred images, so the GPU script's steps cannot rot.
    "tiny": Size(cifar_train=300, real_rows=600, validation=100, test=200, recipes={
        "mnist-real": replace(_CPU, epochs=1), "cifar-real": replace(_CPU, epochs=1),
        "cifar": replace(_CPU, epochs=2), "digits": replace(_CPU, epochs=2)}),
    "quick": Size(cifar_train=600, real_rows=1500, validation=300, test=1000, recipes={
        "mnist-real": replace(_CPU, epochs=2), "cifar-real": replace(_CPU, epochs=2),
        "cifar": replace(_CPU, epochs=3), "digits": replace(_CPU, epochs=5)}),
    "cpu": Size(cifar_train=2000, real_rows=None, validation=1000, test=4000, recipes={
        "mnist-real": replace(_CPU, epochs=6), "cifar-real": replace(_CPU, epochs=4),
        "cifar": replace(_CPU, epochs=10), "digits": _CPU}),
    # GPU: the data README's recipe (ResNet-18, 12 epochs, ~85% on 50k CIFAR-10 in ~15 s on an H100).
    "gpu": Size(cifar_train=None, real_rows=None, validation=1000, test=None, recipes={
        "mnist-real": replace(TrainConfig(), model="small-cnn"), "cifar-real": PRESETS["full-gpu"],
        "cifar": PRESETS["full-gpu"], "digits": TrainConfig()}),
}


@dataclass
class Experiment:
    """One setting made concrete: the data every method sees, the truth, and the recipe."""

    name: str
    train: Dataset
    is_noisy: np.ndarray  # the truth: injected flips, or human-validated errors
    true_labels: np.ndarray  # the right label per row where known, -1 elsewhere (relabel top-1)
    validation: Dataset
    validation_trusted: bool
    test: Dataset | None  # clean held-out data (injected settings only): test accuracy and recovery
    config: TrainConfig
    description: list[str]


def build_experiment(name: str, size: Size, root, *, seed: int, device: str) -> Experiment:
    """Load and split the data of setting ``name``; ``root`` is called only for the shared data."""
    family, _, tag = name.partition("-")
    real = tag.startswith("real")
    recipe = size.recipes[f"{family}-real" if real else family]
    config = replace(recipe, seed=seed, device=recipe.device if recipe.device != "auto" else device).validate()
    if real:
        return _real(name, family, size, root(), config, seed, trusted=tag == "real-trusted")
    return _injected(name, family, tag, size, root, config, seed)


def _real(name: str, family: str, size: Size, root: Path, config: TrainConfig, seed: int, *,
          trusted: bool = False) -> Experiment:
    full = load_mnist_test(root) if family == "mnist" else load_cifar10(root, "test")
    table = load_label_errors(root, "mnist" if family == "mnist" else "cifar10")
    total_errors = int(known_errors(full, table).is_error.sum())
    if size.real_rows is not None and size.real_rows < len(full):
        full = full.subset(_rows_keeping(known_errors(full, table).is_error, size.real_rows, seed))
    if trusted:
        return _real_trusted(name, full, table, total_errors, config, seed)
    validation = carve_validation(full, REAL_VALIDATION_FRACTION, seed=seed)[1]
    errors = known_errors(full, table)
    correctable = int((errors.is_error & (errors.true_labels >= 0)).sum())
    errors_in_validation = int((errors.is_error & np.isin(full.index, validation.index)).sum())
    description = [
        f"Data: {full.source}, labels as given: {len(full):,} rows, all trained on and scored; the truth is "
        f"{int(errors.is_error.sum())} of the {total_errors} human-validated label errors "
        f"(../shared/data/label_errors), {correctable} of them correctable (relabel top-1 is measured on those).",
        f"Validation (only for methods that require one): {len(validation):,} rows carved from the same set with "
        f"`carve_validation(fraction={REAL_VALIDATION_FRACTION}, seed={seed})`: **untrusted** (the given labels; "
        "the shared data hold no clean held-out set) and **also training rows** (every row is scored), "
        f"holding {errors_in_validation} of the errors.",
    ]
    return Experiment(name, full, errors.is_error, errors.true_labels, validation, False, None, config, description)


def _real_trusted(name: str, full: Dataset, table: pd.DataFrame, total_errors: int, config: TrainConfig,
                  seed: int) -> Experiment:
    """Hold out a clean validation set from the rows that are not known errors; train and score the rest."""
    clean_rows = np.flatnonzero(~known_errors(full, table).is_error)
    held_out = carve_validation(full.subset(clean_rows), REAL_VALIDATION_FRACTION, seed=seed)[1]
    validation = replace(held_out, source=f"{full.source} (held-out clean rows)")
    train_set = full.subset(~np.isin(full.index, validation.index))
    errors = known_errors(train_set, table)
    correctable = int((errors.is_error & (errors.true_labels >= 0)).sum())
    description = [
        f"Data: {full.source}, labels as given: {len(train_set):,} rows trained on and scored; the truth is "
        f"{int(errors.is_error.sum())} of the {total_errors} human-validated label errors "
        f"(../shared/data/label_errors), {correctable} of them correctable (relabel top-1 is measured on those).",
        f"Validation (only for methods that require one): {len(validation):,} rows held out of the same set, "
        f"a stratified {REAL_VALIDATION_FRACTION:.0%} of the rows that are not known errors (seed {seed}): "
        "**trusted**, and never trained on nor scored.",
    ]
    return Experiment(name, train_set, errors.is_error, errors.true_labels, validation, True, None, config,
                      description)


def _rows_keeping(is_error: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` row positions: every known error plus a seeded random choice of the others."""
    others = np.flatnonzero(~is_error)
    chosen = np.random.default_rng(seed).choice(others, size=count - int(is_error.sum()), replace=False)
    return np.sort(np.concatenate([np.flatnonzero(is_error), chosen]))


def _injected(name: str, family: str, tag: str, size: Size, root, config: TrainConfig, seed: int) -> Experiment:
    kind, rate = NOISE[tag]
    if family == "digits":
        clean, validation, test = (load_dataset(spec) for spec in ("sample", "sample:val", "sample:test"))
        origin = "the embedded digits (sample:train); validation sample:val, test sample:test"
    else:
        data = root()
        labels = cifar10_train_labels(data)
        rows = None
        if size.cifar_train is not None and size.cifar_train < len(labels):
            rows = np.sort(train_test_split(np.arange(len(labels)), train_size=size.cifar_train, stratify=labels,
                                            random_state=seed)[0])
        clean = load_cifar10(data, "train", rows=rows)
        validation, test = _validation_and_test(load_cifar10(data, "test"), size, seed)
        origin = (f"CIFAR-10 train ({'all' if rows is None else 'stratified subset, seed ' + str(seed)}); "
                  f"validation and test: disjoint stratified parts of the CIFAR-10 test set (seed {seed})")
    noisy = with_injected_noise(clean, rate=rate, kind=kind, seed=seed)
    description = [
        f"Data: {len(clean):,} training rows from {origin}.",
        f"Noise: {rate:.0%} {kind} flips (`with_injected_noise`, seed {seed}): "
        f"{int(noisy.flipped.sum()):,} flipped rows.",
        f"Validation: {len(validation):,} clean rows (**trusted**); test: {len(test):,} clean rows.",
    ]
    return Experiment(name, noisy.dataset, noisy.flipped, noisy.clean_labels, validation, True, test, config,
                      description)


def _validation_and_test(test_set: Dataset, size: Size, seed: int) -> tuple[Dataset, Dataset]:
    n = len(test_set)
    fractions = [size.validation / n]
    if size.test is None or size.validation + size.test >= n:
        fractions.append(1.0 - fractions[0])
    else:
        fractions += [size.test / n, 1.0 - (size.validation + size.test) / n]
    parts = stratified_split(test_set, tuple(fractions), seed=seed)
    return parts[0], parts[1]


def train_base(exp: Experiment, progress: Progress) -> tuple[TrainedModel, dict]:
    """Train θ* once; the row reports the recipe, its time and accuracies."""
    start = time.perf_counter()
    trained = train(exp.train, exp.config, progress=progress)
    row = {"kind": "training", "method": "(training)", "n": len(exp.train), "seconds": time.perf_counter() - start,
           "model": trained.model_name, "device": str(trained.device), "epochs": exp.config.epochs,
           "batch_size": exp.config.batch_size, "learning_rate": exp.config.learning_rate,
           "train_accuracy": trained.history[-1]["accuracy"],
           "validation_accuracy": evaluate(trained, exp.validation)}
    if exp.test is not None:
        row["test_accuracy"] = evaluate(trained, exp.test)
    return trained, row


def detect(exp: Experiment, trained: TrainedModel, method: str, progress: Progress) -> tuple[dict, ScoreResult]:
    """Score with one method on the shared model, and measure it against the truth."""
    needs_validation = scorer_class(method).requires_validation
    run = score_methods(exp.train, [method], validation=exp.validation if needs_validation else None,
                        validation_trusted=exp.validation_trusted, config=exp.config, trained=trained,
                        progress=progress)
    result = run.results[method]
    row = {"kind": "detection", "method": method, "n": len(exp.train), "n_noisy": int(exp.is_noisy.sum()),
           **detection_metrics(result.scores, exp.is_noisy)}
    if exp.test is None:
        for k in REAL_TOP_K:
            row[f"hits_at_{k}"] = int(exp.is_noisy[top_k(result.scores, k)].sum())
    judged = exp.is_noisy & (exp.true_labels >= 0)
    row["relabel_n"] = int(judged.sum())
    row["relabel_top1"] = float((result.suggested_labels[judged] == exp.true_labels[judged]).mean()) \
        if judged.any() else float("nan")
    row["prepare_seconds"] = result.timings.get("prepare_seconds", 0.0)
    row["score_seconds"] = result.timings.get("score_seconds", 0.0)
    row["seconds"] = row["prepare_seconds"] + row["score_seconds"]
    row["validation"] = (f"{len(exp.validation)} {'trusted' if exp.validation_trusted else 'untrusted'}"
                         if needs_validation else "")
    row["info"] = json.dumps(result.info, default=str)
    row["settings"] = json.dumps(result.settings, default=str)
    return row, result


def _decisions(train_set: Dataset, rows: np.ndarray, action: str, new_labels: np.ndarray | None = None) -> pd.DataFrame:
    return pd.DataFrame({"index": train_set.index[rows], "action": action,
                         "new_label": -1 if new_labels is None else new_labels})


def recovery(exp: Experiment, trained: TrainedModel, results: dict[str, ScoreResult], methods: list[str],
             noisy_accuracy: float, progress: Progress) -> list[dict]:
    """Drop / relabel the top-k (k = number of flips), retrain with the same recipe, test accuracy."""
    k = int(exp.is_noisy.sum())
    flips = np.flatnonzero(exp.is_noisy)
    plans = [("oracle", "drop", flips, None), ("oracle", "relabel", flips, exp.true_labels[flips])]
    for method in methods:
        rows = top_k(results[method].scores, k)
        plans += [(method, "drop", rows, None), (method, "relabel", rows, results[method].suggested_labels[rows])]
    out = [{"kind": "recovery", "method": "(noisy baseline)", "action": "none", "k": 0, "n": len(exp.train),
            "test_accuracy": noisy_accuracy, "delta": 0.0}]
    for method, action, rows, new_labels in tqdm(plans, desc=f"{exp.name} recovery", leave=False):
        start = time.perf_counter()
        cleaned = apply_decisions(exp.train, _decisions(exp.train, rows, action, new_labels))
        after = train(cleaned, replace(exp.config, model=trained.model_name), task=trained.task, progress=progress)
        accuracy = evaluate(after, exp.test)
        row = {"kind": "recovery", "method": method, "action": action, "k": len(rows), "n": len(cleaned),
               "test_accuracy": accuracy, "delta": accuracy - noisy_accuracy,
               "flips_in_top_k": int(exp.is_noisy[rows].sum()), "seconds": time.perf_counter() - start}
        if new_labels is not None:
            given = exp.train.labels[rows]
            row["labels_changed"] = int((new_labels != given).sum())
            row["labels_fixed"] = int((exp.is_noisy[rows] & (new_labels == exp.true_labels[rows])).sum())
            row["labels_broken"] = int((~exp.is_noisy[rows] & (new_labels != given)).sum())
        out.append(row)
    return out


def recovery_methods(detection_rows: list[dict], requested: list[str] | None, top: int) -> list[str]:
    """``requested``, or loss and cleanlab plus the ``top`` best other methods by AUROC in this run."""
    scored = [r for r in detection_rows if not r.get("error")]
    names = [r["method"] for r in scored]
    if requested:
        return [m for m in requested if m in names]
    best = sorted((r for r in scored if r["method"] not in NON_INFLUENCE), key=lambda r: -r["auroc"])[:top]
    return [m for m in ("loss", "cleanlab") if m in names] + [r["method"] for r in best]


def _model_state(trained: TrainedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trained.model.state_dict().items()}


def _restore_if_changed(trained: TrainedModel, reference: dict[str, torch.Tensor]) -> bool:
    """A scorer must not touch θ*; if one did, put θ* back so the next method sees the same model."""
    state = trained.model.state_dict()
    changed = any(not torch.equal(state[k], v) for k, v in reference.items())
    if changed:
        trained.model.load_state_dict(reference)
    trained.model.eval()
    return changed


def run_setting(name: str, size_name: str, methods: list[str], args: argparse.Namespace, root) -> list[dict]:
    """Every measurement of one setting, as rows (also printed as JSON lines)."""
    progress = tqdm_progress()
    base = {"setting": name, "size": size_name}
    exp = build_experiment(name, SIZES[size_name], root, seed=args.seed, device=args.device)
    trained, training_row = train_base(exp, progress)
    rows = [emit({**base, **training_row})]
    reference = _model_state(trained)
    results: dict[str, ScoreResult] = {}
    detection_rows = []
    for method in tqdm(methods, desc=f"{name} methods", leave=False):
        try:
            row, results[method] = detect(exp, trained, method, progress)
        except Exception as exc:  # one broken scorer must not hide the others' numbers
            traceback.print_exc(file=sys.stderr)
            row = {"kind": "detection", "method": method, "n": len(exp.train), "error": f"{type(exc).__name__}: {exc}"}
        if _restore_if_changed(trained, reference):
            row["error"] = (row.get("error", "") + " modified the trained model (restored)").strip()
        detection_rows.append(emit({**base, **row}))
    rows += detection_rows
    if args.recovery and exp.test is not None:
        chosen = recovery_methods(detection_rows, args.recovery_methods, args.recovery_top)
        for row in recovery(exp, trained, results, chosen, training_row["test_accuracy"], progress):
            rows.append(emit({**base, **row}))
    write_tables(exp, rows, args, size_name)
    return rows


# ---- tables ----------------------------------------------------------------------------------

def _detection_table(rows: list[dict], real: bool) -> pd.DataFrame:
    ok = sorted((r for r in rows if r["kind"] == "detection" and not r.get("error")), key=lambda r: -r["auroc"])
    table = []
    for r in ok:
        entry = {"method": r["method"]}
        if real:
            entry.update({f"top {k}": f"{r[f'hits_at_{k}']}/{r['n_noisy']}" for k in REAL_TOP_K})
        entry.update({"AUROC": cell(r["auroc"]), "AP": cell(r["ap"]), "P@k": cell(r["precision_at_k"]),
                      "R@1%": cell(r["recall_at_1pct"]), "R@2%": cell(r["recall_at_2pct"]),
                      "R@5%": cell(r["recall_at_5pct"]),
                      "relabel top-1": f"{cell(r['relabel_top1'], 2)} ({r['relabel_n']})" if r["relabel_n"] else "",
                      "seconds": cell(r["seconds"], 1), "N": r["n"], "validation": r["validation"]})
        table.append(entry)
    training = next(r for r in rows if r["kind"] == "training")
    table.append({"method": "(training θ*, shared by all)", "seconds": cell(training["seconds"], 1),
                  "N": training["n"]})
    return pd.DataFrame(table).fillna("")


def _recovery_table(rows: list[dict]) -> pd.DataFrame:
    table = []
    for r in (r for r in rows if r["kind"] == "recovery"):
        changed = "" if "labels_changed" not in r else \
            f"{r['labels_changed']} changed: {r['labels_fixed']} fixed, {r['labels_broken']} broken"
        table.append({"method": r["method"], "action": r["action"], "k": r["k"], "train N": r["n"],
                      "test accuracy": cell(r["test_accuracy"], 4), "Δ vs noisy": f"{r['delta'] * 100:+.2f} pt",
                      "true flips in top-k": r.get("flips_in_top_k", ""), "relabels": changed})
    return pd.DataFrame(table)


def write_tables(exp: Experiment, rows: list[dict], args: argparse.Namespace, size_name: str) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = exp.name if size_name == "cpu" else f"{exp.name}-{size_name}"
    pd.DataFrame(rows).to_csv(out / f"{stem}.csv", index=False)
    training = next(r for r in rows if r["kind"] == "training")
    accuracy = f", test accuracy {training['test_accuracy']:.4f}" if "test_accuracy" in training else ""
    md = [f"# Detection: `{exp.name}` ({size_name} size)", "",
          "```", args.command, "```", "",
          f"Run {args.started} on {args.machine}." + (
              " The CPU is shared with other jobs, so seconds are noisy (±50% or worse); compare them within a "
              "table, not across runs." if training["device"] == "cpu" else ""), ""]
    md += [f"- {line}" for line in exp.description]
    md += [f"- Model θ*: {training['model']} on {training['device']}, {training['epochs']} epochs, batch "
           f"{training['batch_size']}, peak lr {training['learning_rate']}, seed {args.seed}; trained in "
           f"{training['seconds']:.1f} s; last-epoch accuracy on the given (augmented) training labels "
           f"{training['train_accuracy']:.4f}, "
           f"validation {training['validation_accuracy']:.4f}{accuracy}.", ""]
    real = exp.test is None
    k = int(exp.is_noisy.sum())
    md += [f"## Detection ({k} {'known errors' if real else 'flipped labels'} among {len(exp.train):,} rows; "
           "P@k at k = that number; sorted by AUROC)", "", markdown_table(_detection_table(rows, real)), ""]
    errors = [r for r in rows if r["kind"] == "detection" and r.get("error")]
    if errors:
        md += ["Failed: " + "; ".join(f"`{r['method']}`: {r['error']}" for r in errors), ""]
    if any(r["kind"] == "recovery" for r in rows):
        md += [f"## Recovery (drop or relabel the top {k}, retrain with the same recipe and seed; test accuracy)",
               "", markdown_table(_recovery_table(rows)), ""]
    md += ["Columns: AUROC and AP against the truth; P@k = precision of the top k; R@x% = recall of the truth in "
           "the top x% of the ranking; relabel top-1 = share of the truly wrong rows (with a known right label) "
           "whose suggested label is the right one (count in brackets); seconds = prepare + score, each method "
           "including its own forward passes; N = rows scored.", ""]
    (out / f"{stem}.md").write_text("\n".join(md))
    write_summary(out)


def write_summary(out: Path) -> None:
    """AUROC of every method in every setting whose table is in ``out``: ``summary.md``, and the
    machine-readable ``summary.json`` the dashboard's defaults come from (copied into the package,
    ``engine/measured_methods.json``, when ``out`` is the committed results folder)."""
    frames = [pd.read_csv(p) for p in sorted(out.glob("*.csv"))]
    frames = [f for f in frames if "kind" in f.columns]
    if not frames:
        return
    rows = pd.concat(frames, ignore_index=True)
    detection = rows[(rows["kind"] == "detection") & rows["auroc"].notna()]
    if detection.empty:
        return
    detection = detection.assign(column=[s if z == "cpu" else f"{s} ({z})" for s, z in
                                         zip(detection["setting"], detection["size"], strict=True)])
    pivot = detection.pivot_table(index="method", columns="column", values="auroc", aggfunc="first")
    pivot = pivot.loc[pivot.mean(axis=1).sort_values(ascending=False).index]
    table = pivot.map(cell).reset_index()
    text = ["# Detection AUROC by setting", "",
            "Generated from the tables in this folder (each `<setting>.md` holds its command, data and model).", "",
            markdown_table(table), ""]
    text += _side_studies(out)
    (out / "summary.md").write_text("\n".join(text))
    summary = json.dumps(_summary_json(detection), indent=1) + "\n"
    (out / "summary.json").write_text(summary)
    if out.resolve() == DEFAULT_OUT.resolve():
        MEASURED_FILE.write_text(summary)


def _summary_json(detection: pd.DataFrame) -> dict:
    """Per method: AUROC per setting, its mean, and the mean relabel top-1 (engine.measured reads it)."""
    methods = []
    for method, rows in detection.groupby("method"):
        auroc = {c: round(float(a), 4) for c, a in zip(rows["column"], rows["auroc"], strict=True)}
        relabel = rows["relabel_top1"].dropna() if "relabel_top1" in rows else pd.Series(dtype=float)
        methods.append({"method": method, "mean_auroc": round(float(np.mean(list(auroc.values()))), 4),
                        "auroc": auroc,
                        "mean_relabel_top1": round(float(relabel.mean()), 4) if len(relabel) else None})
    methods.sort(key=lambda m: (-len(m["auroc"]), -m["mean_auroc"]))
    return {"generated_by": "python benchmarks/detection.py --summary-only (from benchmarks/results/*.csv)",
            "ranked_by": "settings measured, then mean AUROC over them",
            "settings": sorted(detection["column"].unique().tolist()), "methods": methods}


SIDE_STUDIES = ("flagship-variants", "own-model")  # tables other benchmark scripts write into this folder


def _side_studies(out: Path) -> list[str]:
    """A pointer per side study whose table is in ``out``: its title, its command and its headline lines."""
    lines = []
    for stem in SIDE_STUDIES:
        path = out / f"{stem}.md"
        if path.is_file():
            study = path.read_text().splitlines()
            headline = [line for line in study if line.startswith("**")]
            lines += [f"## {study[0].lstrip('# ')}", "", f"[{path.name}]({path.name}), from:", "",
                      *study[2:5], "", *headline, ""]
    return lines


# ---- command line -----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary-only", action="store_true",
                        help="only regenerate summary.md / summary.json from the tables in --out")
    parser.add_argument("--setting", action="append",
                        help=f"one of {', '.join(SETTINGS)}, or all (repeatable, or comma-separated)")
    parser.add_argument("--methods", default=None, help="comma-separated subset (default: every registered method)")
    parser.add_argument("--size", default="cpu", choices=("cpu", "gpu", "tiny"),
                        help="data and model size (default cpu; tiny: a smoke run of a few hundred images)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (written to benchmarks/out/)")
    parser.add_argument("--recovery", action="store_true", help="also drop / relabel the top-k and retrain")
    parser.add_argument("--recovery-methods", default=None,
                        help="comma-separated methods for recovery (default: loss, cleanlab and the best others)")
    parser.add_argument("--recovery-top", type=int, default=2,
                        help="how many of the best influence methods get a recovery run (default 2)")
    parser.add_argument("--data-root", default=None, help="the shared data folder (default: ../shared/data, "
                        "then device_data/; or $INFLUENCE_LENS_DATA)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (the gpu size always uses cuda)")
    parser.add_argument("--seed", type=int, default=0, help="seed for subsets, splits, noise and training")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared cores)")
    parser.add_argument("--out", default=None, help="folder for the tables (default benchmarks/results, "
                        "or benchmarks/out with --quick)")
    return parser


def _settings(values: list[str]) -> list[str]:
    names = comma_list(values)
    if "all" in names:
        return list(SETTINGS)
    for name in names:
        if name not in SETTINGS:
            raise OptionError("setting", name, (*SETTINGS, "all"))
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    size_name = "quick" if args.quick else args.size
    args.out = args.out or str(QUICK_OUT if size_name in ("quick", "tiny") else DEFAULT_OUT)
    args.command = "python benchmarks/detection.py " + " ".join(shlex.quote(a) for a in argv)
    args.started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    args.machine = machine_description(args.device)
    if args.summary_only:
        write_summary(Path(args.out))
        return 0
    try:
        if not args.setting:
            raise InfluenceLensError("--setting is required (or --summary-only)")
        settings = _settings(args.setting)
        methods = comma_list(args.methods) or available_methods()
        for method in methods + comma_list(args.recovery_methods):
            scorer_class(method)  # an unknown name fails now, listing the valid ones
        args.recovery_methods = comma_list(args.recovery_methods) or None
        if size_name == "gpu":
            if not torch.cuda.is_available():
                raise InfluenceLensError("--size gpu needs a CUDA GPU; use --size cpu (the default) here")
            args.device = "cuda"
        root_cache: dict[str, Path] = {}

        def root() -> Path:
            if "root" not in root_cache:
                root_cache["root"] = data_root(args.data_root)
            return root_cache["root"]

        for name in settings:
            run_setting(name, size_name, methods, args, root)
    except InfluenceLensError as exc:
        print(f"detection: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
