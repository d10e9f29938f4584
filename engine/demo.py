"""The numbers behind the "Why it works" page: a five-minute story told on data with injected noise.

Four steps, each computed with the engine's own functions, on a dataset whose flipped labels are
known (by default the sample digits with 20% symmetric noise):

(a) budgets: train for increasing epoch budgets (each its own run and schedule) and measure the
    AUROC of the training loss, cleanlab and FVM against the flips: the loss ranking collapses as
    the model memorizes the wrong labels, FVM holds;
(b) landscape: the validation loss along one random filter-normalised direction (Li et al. 2018)
    around θ̃, for the plain SGD fine-tune (VM) and the SAM one (FVM): a sharp vs. a flat minimum;
(c) top: the images FVM flags first at the largest budget, with the given and suggested labels;
(d) recovery: test accuracy before and after relabeling FVM's top-k with its suggestions.

The result is small and plain (JSON numbers, the top images in an ``.npz``), cached in a folder
under a hash of the settings, so the page shows a finished demo at once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from engine.config import PRESETS
from engine.data import Dataset, load_dataset, stratified_split
from engine.errors import DataError, OptionError
from engine.explain import fix_top
from engine.finetune import RECIPES, FinetuneConfig, finetune
from engine.metrics import detection_metrics, top_k
from engine.pipeline import check_compatible, retrain_comparison, score_methods, with_injected_noise
from engine.progress import Progress, no_progress
from engine.scorers import scorer_class
from engine.task import cross_entropy
from engine.training import TrainedModel, evaluate, predict, train

DEMO_METHODS = ("loss", "cleanlab", "fvm")
LANDSCAPE_OPTIMIZERS = {"sgd": "SGD fine-tune (VM)", "sam": "SAM fine-tune (FVM)"}
FORMAT = 1  # bump when the stored layout or the computation changes: older cached demos are recomputed
CARVED = 0.1  # share of the clean data carved out for a missing validation or test set


@dataclass(frozen=True)
class DemoSettings:
    """What the demo computes. ``validation`` / ``test`` of None: ``sample:val`` / ``sample:test`` on the
    sample data, else carved (stratified, before the noise, so they stay clean) out of ``data``."""

    data: str = "sample"
    validation: str | None = None
    test: str | None = None
    noise_rate: float = 0.2
    noise_kind: str = "symmetric"
    budgets: tuple[int, ...] = (5, 10, 20, 40)  # digits, 20%: the loss holds to ~20 epochs, then memorizes
    preset: str = "fast-cpu"
    finetune_epochs: int = RECIPES["small-cnn"].epochs  # the demo's digits train the small CNN
    depths: tuple[float, ...] = (0.25, 0.5, 1.0)  # k for (d), as fractions of the number of flipped labels
    steps: int = 21  # points along the direction, from -radius to +radius
    radius: float = 0.5  # in filter norms; by ±1 both losses are in the tens and the minima look alike
    directions: int = 3  # curves averaged over this many random directions (one can fall on a flat valley)
    top: int = 24
    seed: int = 0

    def validate(self) -> DemoSettings:
        if self.preset not in PRESETS:
            raise OptionError("preset", self.preset, list(PRESETS))
        if not 0 < self.noise_rate < 1:
            raise DataError(f"the demo needs injected noise: a rate in (0, 1), got {self.noise_rate}")
        checks = {"budgets": (bool(self.budgets) and min(self.budgets) >= 1, "positive epoch counts"),
                  "depths": (all(0 < f <= 1 for f in self.depths), "fractions in (0, 1]"),
                  "steps": (self.steps >= 3 and self.steps % 2 == 1, "an odd number, 3 or more (α = 0 in the middle)"),
                  "radius": (self.radius > 0, "a positive number"),
                  "directions": (self.directions >= 1, "a positive integer"),
                  "top": (self.top >= 1, "a positive integer"),
                  "finetune_epochs": (self.finetune_epochs >= 1, "a positive integer")}
        for name, (ok, valid) in checks.items():
            if not ok:
                raise OptionError(name, getattr(self, name), [valid])
        return self

    def quick(self) -> DemoSettings:
        """The same data with small budgets: a rehearsal (and the tests) in well under a minute."""
        return replace(self, budgets=(2, 5), finetune_epochs=10, depths=(0.5, 1.0), steps=11, top=12)

    def key(self) -> str:
        """Names the cached result: the settings, the data path as resolved, and ``FORMAT``."""
        values = {**asdict(self), "format": FORMAT}
        for name in ("data", "validation", "test"):
            if values[name] and not values[name].startswith("sample"):
                values[name] = str(Path(values[name]).expanduser().resolve())
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class DemoResult:
    """The numbers of the four steps (plain JSON) and the top-flagged images (row-aligned with
    ``numbers["top"]["rows"]``)."""

    numbers: dict
    images: np.ndarray
    from_cache: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class DemoData:
    noisy: Dataset
    flipped: np.ndarray
    clean_labels: np.ndarray
    validation: Dataset
    test: Dataset


def load_demo_data(settings: DemoSettings) -> DemoData:
    """The training set with its injected noise, and a clean validation and test set."""
    full = load_dataset(settings.data)
    on_sample = settings.data == "sample" or settings.data.startswith("sample:")
    specs = {"validation": settings.validation or ("sample:val" if on_sample else None),
             "test": settings.test or ("sample:test" if on_sample else None)}
    missing = [role for role, spec in specs.items() if spec is None]
    train_set, *carved = stratified_split(full, (1 - CARVED * len(missing), *[CARVED] * len(missing)),
                                          seed=settings.seed) if missing else [full]
    parts = dict(zip(missing, carved, strict=True))
    for role, spec in specs.items():
        if spec is not None:
            parts[role] = load_dataset(spec)
            check_compatible(full, parts[role], role)
    noisy = with_injected_noise(train_set, rate=settings.noise_rate, kind=settings.noise_kind, seed=settings.seed)
    return DemoData(noisy.dataset, noisy.flipped, noisy.clean_labels, parts["validation"], parts["test"])


# -- (b) the validation loss around θ̃ ---------------------------------------------------------------

def filter_normalized_direction(model: nn.Module, *, seed: int = 0) -> list[torch.Tensor]:
    """A Gaussian direction, one tensor per parameter, each filter (row of a conv or linear weight)
    rescaled to the norm of the model's own filter; zero on biases and BatchNorm (Li et al. 2018), so
    the picture does not depend on the scale BatchNorm makes arbitrary. The same ``seed`` draws the
    same raw direction for any model of the same shape."""
    generator = torch.Generator().manual_seed(seed)
    direction = []
    for p in model.parameters():
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        if p.ndim < 2:
            direction.append(torch.zeros_like(p))
            continue
        weight = p.detach().float().cpu().flatten(1)
        rows = d.flatten(1)
        rows = rows * (weight.norm(dim=1, keepdim=True) / rows.norm(dim=1, keepdim=True).clamp_min(1e-12))
        direction.append(rows.view_as(p).to(p))
    return direction


def loss_along(model: nn.Module, trained: TrainedModel, dataset: Dataset, direction: list[torch.Tensor],
               alphas: np.ndarray) -> list[float]:
    """Mean cross-entropy on ``dataset`` (eval mode) at θ + α·direction for each α; ``model`` is untouched."""
    moved = copy.deepcopy(model).eval()
    params = list(moved.parameters())
    start = [p.detach().clone() for p in params]
    losses = []
    for alpha in alphas:
        with torch.no_grad():
            for p, p0, d in zip(params, start, direction, strict=True):
                p.copy_(p0 + float(alpha) * d)
        logits = predict(moved, trained.task, dataset.images, trained.device).logits
        losses.append(float(cross_entropy(logits, dataset.labels).mean()))
    return losses


def validation_landscape(trained: TrainedModel, validation: Dataset, *, steps: int = 21, radius: float = 0.5,
                         directions: int = 3, finetune_epochs: int = RECIPES["small-cnn"].epochs, seed: int = 0,
                         progress: Progress = no_progress) -> dict:
    """Fine-tune θ* with SGD and with SAM (the VM and FVM recipes) and trace the validation loss of
    each θ̃ along the same raw random directions, filter-normalised to each minimum.

    Returns ``alphas``, ``loss`` (optimizer → the mean curve over the directions), ``per_direction``
    and ``rise`` (optimizer → mean loss at ±radius minus the loss at θ̃: higher = sharper).
    """
    alphas = np.linspace(-radius, radius, steps)
    per_direction = {}
    for optimizer in LANDSCAPE_OPTIMIZERS:
        tuned = finetune(trained, validation, FinetuneConfig(optimizer=optimizer, epochs=finetune_epochs, seed=seed),
                         progress=progress)
        per_direction[optimizer] = [loss_along(tuned.model, trained, validation,
                                               filter_normalized_direction(tuned.model, seed=seed + d), alphas)
                                    for d in range(directions)]
    curves = {o: np.mean(c, axis=0) for o, c in per_direction.items()}
    rise = {o: float((c[0] + c[-1]) / 2 - c[steps // 2]) for o, c in curves.items()}
    return {"alphas": alphas.tolist(), "loss": {o: c.tolist() for o, c in curves.items()},
            "per_direction": per_direction, "rise": rise}


# -- the whole demo ---------------------------------------------------------------------------------

def _method_settings(settings: DemoSettings) -> dict:
    fvm = scorer_class("fvm").Settings()
    return {"fvm": replace(fvm, finetune=replace(fvm.finetune, epochs=settings.finetune_epochs))}


def compute_demo(settings: DemoSettings, *, progress: Progress = no_progress) -> DemoResult:
    """Compute the four steps (minutes on a CPU for the defaults); see the module docstring."""
    start = time.perf_counter()
    data = load_demo_data(settings.validate())
    train_set, flipped = data.noisy, data.flipped
    depths = sorted({int(round(f * flipped.sum())) for f in settings.depths} - {0})
    total = len(settings.budgets) + 1 + len(depths) + 1
    step = 0

    def begin(what: str) -> Progress:
        """One overall bar (``demo``) and one for the step under way (``now``)."""
        progress(step, total, f"demo: {what}")
        return lambda done, of, message: progress(done, of, f"now: {what}, {message}")

    budgets = {"epochs": list(settings.budgets), "auroc": {m: [] for m in DEMO_METHODS}, "memorized": []}
    for epochs in settings.budgets:
        config = replace(PRESETS[settings.preset], epochs=epochs, seed=settings.seed)
        run = score_methods(train_set, list(DEMO_METHODS), validation=data.validation, config=config,
                            settings=_method_settings(settings), progress=begin(f"{epochs} epochs"))
        for method in DEMO_METHODS:
            budgets["auroc"][method].append(detection_metrics(run.results[method].scores, flipped)["auroc"])
        # the share of wrong labels the model has learned to predict: memorization
        budgets["memorized"].append(float((run.context.predictions.predicted == train_set.labels)[flipped].mean()))
        step += 1
    trained, fvm = run.trained, run.results["fvm"]  # the largest budget

    landscape = validation_landscape(trained, data.validation, steps=settings.steps, radius=settings.radius,
                                     directions=settings.directions, finetune_epochs=settings.finetune_epochs,
                                     seed=settings.seed,
                                     progress=begin("sharp vs. flat validation minimum"))
    step += 1

    rows = top_k(fvm.scores, settings.top)
    top = [{"position": int(r), "index": int(train_set.index[r]), "given": int(train_set.labels[r]),
            "suggested": int(fvm.suggested_labels[r]), "true": int(data.clean_labels[r]),
            "flipped": bool(flipped[r]), "score": float(fvm.scores[r])} for r in rows]

    points = []
    for k in depths:
        decisions = fix_top(train_set, fvm.scores, k, fvm.suggested_labels)
        report = retrain_comparison(train_set, decisions, data.test, config=trained.config, before=trained,
                                    progress=begin(f"relabel the top {k}"))
        positions = pd.Index(train_set.index).get_indexer(decisions["index"])
        right = int((data.clean_labels[positions] == decisions["new_label"].to_numpy()).sum())
        points.append({"k": k, "relabeled": len(decisions), "relabeled_right": right,
                       "accuracy": report["test_accuracy_after"]})
        step += 1
    clean = train(train_set.with_labels(data.clean_labels), trained.config, task=trained.task,
                  progress=begin("every label correct (the ceiling)"))
    step += 1
    progress(total, total, "demo: done")

    numbers = {
        "format": FORMAT, "key": settings.key(), "settings": asdict(settings),
        "data": {"source": train_set.source or settings.data, "class_names": list(train_set.class_names),
                 "train": len(train_set), "validation": len(data.validation), "test": len(data.test),
                 "flipped": int(flipped.sum()), "image_shape": list(train_set.image_shape)},
        "budgets": budgets,
        "landscape": {**landscape, "epochs": trained.config.epochs},
        "top": {"epochs": trained.config.epochs, "rows": top, "flipped_in_top": int(flipped[rows].sum())},
        "recovery": {"epochs": trained.config.epochs, "before": evaluate(trained, data.test),
                     "clean": evaluate(clean, data.test), "points": points},
        "seconds": round(time.perf_counter() - start, 1),
    }
    return DemoResult(json.loads(json.dumps(numbers)), train_set.images[rows])  # as the cache gives it back


# -- what the numbers say ---------------------------------------------------------------------------

# An AUROC change smaller than this is within the spread of one training seed on the digits (0.005-0.01
# between seeds at a fixed budget), so it is told as "holds", not as a rise or a fall.
AUROC_CHANGE = 0.01


@dataclass(frozen=True)
class BudgetStory:
    """Step 1 as the measured AUROCs tell it: a quick rehearsal's short budgets can tell the opposite of
    the full demo (the loss still finds the errors before the model has memorized them)."""

    loss_falls: bool  # the loss ranking's AUROC at the largest budget is below its best by > AUROC_CHANGE
    fvm_holds: bool  # FVM's AUROC at the largest budget is within AUROC_CHANGE of its best
    headline: str
    text: str


def budget_story(budgets: dict) -> BudgetStory:
    """The headline and sentence of step 1, derived from ``numbers["budgets"]`` (never assumed)."""
    auroc, last = budgets["auroc"], budgets["epochs"][-1]
    loss, fvm = auroc["loss"], auroc["fvm"]
    loss_falls = max(loss) - loss[-1] > AUROC_CHANGE
    fvm_holds = max(fvm) - fvm[-1] <= AUROC_CHANGE
    memorized = budgets["memorized"][-1]
    figures = (f"the loss ranking's AUROC goes {loss[0]:.3f} → **{loss[-1]:.3f}** and FVM's, which judges each "
               f"image from a model fitted to the trusted validation set, {fvm[0]:.3f} → **{fvm[-1]:.3f}** "
               f"(cleanlab {auroc['cleanlab'][-1]:.3f}).")
    if loss_falls:
        headline = ("Train longer, and the loss stops finding the errors; FVM does not" if fvm_holds
                    else "Train longer, and the loss finds fewer errors; here FVM does too")
        text = (f"The longer a network trains, the more wrong labels it learns by heart (**{memorized:.0%}** of them "
                f"after {last} epochs), so a low training loss stops meaning a correct label: {figures}")
    else:
        headline = (f"Up to {last} epochs the loss still finds the errors" + (" and so does FVM" if fvm_holds else ""))
        text = (f"After {last} epochs the model has learned only **{memorized:.0%}** of the wrong labels by heart, "
                f"so a high training loss still points at them: {figures} Train for more epochs (leave the quick "
                "rehearsal) to see the loss ranking fail as the model memorizes the noise.")
    return BudgetStory(loss_falls, fvm_holds, headline, text)


def landscape_story(landscape: dict) -> tuple[str, str]:
    """Step 2's headline and sentence from ``numbers["landscape"]``: "flat" only when SAM's minimum rose less."""
    rise, alpha = landscape["rise"], landscape["alphas"][-1]
    figures = (f"Fine-tuned on the trusted validation set, plain SGD (VM) stops in a minimum where moving each "
               f"weight filter by {alpha:g}× its own size in a random direction raises the validation loss by "
               f"**{rise['sgd']:.2f}**, against **{rise['sam']:.2f}** around the minimum SAM (FVM) finds")
    if rise["sam"] < rise["sgd"]:
        return ("A flat validation minimum: scores that do not hinge on where fine-tuning stopped",
                f"{figures}: FVM scores the training images at the flatter one, where small changes of the weights "
                "barely change the verdict.")
    return ("Here SAM's validation minimum is not the flatter one",
            f"{figures}: on this run SAM did not find a flatter minimum than plain SGD, so FVM's scores are no "
            "steadier than VM's here.")


def recovery_headline(recovery: dict) -> str:
    """Step 4's headline from ``numbers["recovery"]``, judged on the accuracies as shown (0.1%)."""
    best = max((p["accuracy"] for p in recovery["points"]), default=None)
    if best is not None and round(best, 3) > round(recovery["before"], 3):
        return "Fixing them pays back in accuracy"
    return "Here fixing them did not raise test accuracy"


# -- the cache --------------------------------------------------------------------------------------

def _paths(settings: DemoSettings, folder: str | Path) -> tuple[Path, Path]:
    base = Path(folder) / f"demo-{settings.key()}"
    return base.with_suffix(".json"), base.with_suffix(".npz")


def cached_demo(settings: DemoSettings, folder: str | Path) -> DemoResult | None:
    """The stored result for these settings, or None (never computes)."""
    numbers_path, images_path = _paths(settings, folder)
    if not (numbers_path.exists() and images_path.exists()):
        return None
    numbers = json.loads(numbers_path.read_text())
    if numbers.get("format") != FORMAT:
        return None
    with np.load(images_path) as stored:
        return DemoResult(numbers, stored["images"], from_cache=True)


def run_demo(settings: DemoSettings, folder: str | Path, *, progress: Progress = no_progress) -> DemoResult:
    """The cached result if there is one, else compute it and store it in ``folder``."""
    found = cached_demo(settings, folder)
    if found is not None:
        return found
    result = compute_demo(settings, progress=progress)
    numbers_path, images_path = _paths(settings, folder)
    numbers_path.parent.mkdir(parents=True, exist_ok=True)
    for path, write in ((images_path, lambda f: np.savez_compressed(f, images=result.images)),
                        (numbers_path, lambda f: f.write(json.dumps(result.numbers, indent=1).encode()))):
        partial = path.with_name(path.name + f".{os.getpid()}.part")  # the JSON last: it marks the pair complete
        with open(partial, "wb") as handle:
            write(handle)
        os.replace(partial, path)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.demo [--quick] [--folder DIR]``: prepare the demo headless (the page reads the
    same cache when DIR is its ``workspaces/demo``) and print the figures it shows."""
    import argparse

    from engine.progress import tqdm_progress

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick rehearsal settings")
    parser.add_argument("--folder", default="workspaces/demo", help="cache folder (default %(default)s)")
    args = parser.parse_args(argv)
    settings = DemoSettings().quick() if args.quick else DemoSettings()
    numbers = run_demo(settings, args.folder, progress=tqdm_progress()).numbers
    print(json.dumps({"auroc_by_epochs": {"epochs": numbers["budgets"]["epochs"], **numbers["budgets"]["auroc"]},
                      "memorized": numbers["budgets"]["memorized"], "landscape_rise": numbers["landscape"]["rise"],
                      "flipped_in_top": numbers["top"]["flipped_in_top"], "recovery": numbers["recovery"],
                      "seconds": numbers["seconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
