"""Which form of the flat-validation score wins? Variants scored on one trained model per setting.

    python benchmarks/flagship_variants.py --setting cifar-sym20 --setting cifar-pair20 \\
        --setting mnist-real-trusted --setting cifar-real-trusted

Per setting (``benchmarks/detection.py``'s data, recipe and seed): θ* is trained once (cached in the
git-ignored ``benchmarks/out/flagship/``), the baselines (loss, margin, cleanlab) run through
``score_methods`` on it, and θ̃ is fine-tuned on the trusted validation set with SAM for each
fine-tune seed (and plain SGD once). From those θ̃ come the variants:

- ``fvm`` / ``fvm-loss``: the registered scorers' quantities at one θ̃ (seed 0), recomputed here;
- ``rank(fvm, fvm-loss)``: the mean of the two rankings' percentiles; ``fvm × fvm-loss``: their product;
- ``…×S seeds``: the same averaged over S fine-tune seeds (each seed's θ̃ fits its own curvature);
- ``… over ρ∈{…}``: averaged over the SGD θ̃ and SAM θ̃ at several radii (``--rhos``), seed 0;
  ``… over all θ̃``: over every θ̃ above;
- ``…, fine-tune lr R`` (``--extra-lr``): the SAM and SGD θ̃ fine-tuned at another learning rate;
- fvm's two factors alone: the residual ‖p − e_y‖² and the rest, fvm / ‖p − e_y‖² (why it trails the loss);
- relabel rules: θ̃'s argmax, the argmin of the influence over candidate labels, and both averaged
  over the seeds (argmax of the mean probability, argmin of the mean candidate influence).

Output: one JSON line per variant on stdout and ``benchmarks/results/flagship-variants.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `benchmarks` importable

from benchmarks.common import REPO_ROOT, data_root, machine_description  # noqa: E402
from benchmarks.detection import (  # noqa: E402
    SIZES,
    Experiment,
    build_experiment,
    detect,
    train_base,
    write_summary,
)
from engine.curvature import DEFAULT_RELATIVE_DAMPING, fit_head_curvature  # noqa: E402
from engine.finetune import FinetuneConfig, finetune  # noqa: E402
from engine.metrics import detection_metrics  # noqa: E402
from engine.progress import no_progress  # noqa: E402
from engine.task import cross_entropy  # noqa: E402
from engine.training import TrainedModel, predict  # noqa: E402

CACHE = REPO_ROOT / "benchmarks" / "out" / "flagship"  # git-ignored
OUT = REPO_ROOT / "benchmarks" / "results" / "flagship-variants.md"
BASELINES = ("loss", "margin", "cleanlab")


def percentile_rank(scores: np.ndarray) -> np.ndarray:
    return rankdata(scores) / len(scores)


def cached_theta_star(exp: Experiment, seed: int) -> tuple[TrainedModel, dict]:
    path = CACHE / f"{exp.name}-seed{seed}-theta.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        trained, row = saved["trained"], saved["row"]
    else:
        trained, row = train_base(exp, no_progress)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save({"trained": trained, "row": row}, path)
    return trained, row


def cached_baseline(exp: Experiment, trained: TrainedModel, method: str, seed: int, *,
                    cached_only: bool = False) -> dict | None:
    path = CACHE / f"{exp.name}-seed{seed}-{method}.npz"
    if not path.is_file() and cached_only:
        return None
    if not path.is_file():
        row, result = detect(exp, trained, method, no_progress)
        np.savez(path, scores=result.scores, suggested=result.suggested_labels, seconds=row["seconds"])
    with np.load(path) as saved:
        return {"scores": saved["scores"], "suggested": saved["suggested"], "seconds": float(saved["seconds"])}


def theta_tilde_outputs(exp: Experiment, trained: TrainedModel, config: FinetuneConfig, seed: int, *,
                        cached_only: bool = False) -> dict | None:
    """Loss, probabilities and candidate influences of the training rows at one θ̃ (cached; None when
    ``cached_only`` and no earlier run computed it)."""
    tag = f"{config.optimizer}-rho{config.rho}-ft{config.seed}"
    if config.learning_rate != FinetuneConfig.learning_rate:
        tag += f"-lr{config.learning_rate}"
    path = CACHE / f"{exp.name}-seed{seed}-{tag}.npz"
    if not path.is_file() and cached_only:
        return None
    if not path.is_file():
        start = time.perf_counter()
        tuned = finetune(trained, exp.validation, config)
        model = tuned.model
        fit = predict(model, trained.task, exp.validation.images, trained.device)
        curvature = fit_head_curvature(model, fit, trained.device, DEFAULT_RELATIVE_DAMPING)
        target = predict(model, trained.task, exp.train.images, trained.device)
        candidates = curvature.candidate_scores(target.features, target.probabilities)
        np.savez(path, loss=cross_entropy(target.logits, exp.train.labels), probabilities=target.probabilities,
                 candidates=candidates, seconds=time.perf_counter() - start,
                 validation_accuracy=tuned.validation_accuracy)
    with np.load(path) as saved:
        return {k: saved[k] for k in saved.files}


def measure(exp: Experiment, name: str, scores: np.ndarray, suggested: np.ndarray, seconds: float) -> dict:
    judged = exp.is_noisy & (exp.true_labels >= 0)
    metrics = detection_metrics(scores, exp.is_noisy)
    return {"setting": exp.name, "variant": name, "auroc": metrics["auroc"], "ap": metrics["ap"],
            "recall_at_2pct": metrics["recall_at_2pct"],
            "relabel_top1": float((suggested[judged] == exp.true_labels[judged]).mean()),
            "relabel_n": int(judged.sum()), "seconds": seconds}


def variants(exp: Experiment, outputs: list[dict], sgd: dict,
             radii: dict[float, dict]) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    labels, rows = exp.train.labels, np.arange(len(exp.train))
    out = []
    groups = [("", outputs[:1])]
    if len(outputs) > 1:
        groups.append((f"×{len(outputs)} seeds", outputs))
    if radii:
        radii_tag = f" over ρ∈{{0 (sgd), {', '.join(map(str, sorted(radii)))}}}"
        groups.append((radii_tag, [sgd, outputs[0], *radii.values()]))
        groups.append((" over all θ̃", [sgd, *outputs, *radii.values()]))
    for tag, group in groups:
        seconds = sum(float(o["seconds"]) for o in group)
        influence = np.mean([o["candidates"][rows, labels] for o in group], axis=0)
        loss = np.mean([o["loss"] for o in group], axis=0)
        argmax = np.mean([o["probabilities"] for o in group], axis=0).argmax(1)
        argmin = np.mean([o["candidates"] for o in group], axis=0).argmin(1)
        combined = (percentile_rank(influence) + percentile_rank(loss)) / 2
        out += [(f"fvm{tag}", influence, argmin, seconds), (f"fvm-loss{tag}", loss, argmax, seconds),
                (f"rank(fvm, fvm-loss){tag}", combined, argmin, seconds),
                (f"rank(fvm, fvm-loss){tag}, relabel argmax", combined, argmax, seconds),
                (f"fvm × fvm-loss{tag}", influence * loss, argmin, seconds)]
    # fvm's two factors (head gradient (p − e_y) ⊗ a): the residual ‖p − e_y‖², bounded by 2 where the
    # loss is not, and the rest, fvm / ‖p − e_y‖²: mostly the features' leverage under the curvature.
    first = outputs[0]
    residual = np.square(first["probabilities"] - np.eye(first["probabilities"].shape[1])[labels]).sum(1)
    influence = first["candidates"][rows, labels]
    out += [("fvm's residual factor ‖p − e_y‖²", residual, first["probabilities"].argmax(1), 0.0),
            ("fvm's curvature factor fvm / ‖p − e_y‖²", influence / residual, first["candidates"].argmin(1), 0.0)]
    sgd_influence = sgd["candidates"][rows, labels]
    out += [("vm", sgd_influence, sgd["candidates"].argmin(1), float(sgd["seconds"])),
            ("vm-loss", sgd["loss"], sgd["probabilities"].argmax(1), float(sgd["seconds"])),
            ("rank(vm, vm-loss)", (percentile_rank(sgd_influence) + percentile_rank(sgd["loss"])) / 2,
             sgd["candidates"].argmin(1), float(sgd["seconds"]))]
    return out


def run(name: str, args: argparse.Namespace) -> list[dict]:
    exp = build_experiment(name, SIZES["cpu"], lambda: data_root(args.data_root), seed=args.seed, device="cpu")
    trained, training = cached_theta_star(exp, args.seed)
    rows = []
    for method in BASELINES:
        result = cached_baseline(exp, trained, method, args.seed, cached_only=args.cached_only and method == "cleanlab")
        if result is not None:
            rows.append(measure(exp, method, result["scores"], result["suggested"], result["seconds"]))
    recipe = FinetuneConfig(learning_rate=args.finetune_lr)
    sam = [theta_tilde_outputs(exp, trained, replace(recipe, rho=args.rho, seed=s), args.seed,
                               cached_only=s > 0 and args.cached_only) for s in range(args.finetune_seeds)]
    sam = [o for o in sam if o is not None]
    sgd = theta_tilde_outputs(exp, trained, replace(recipe, optimizer="sgd"), args.seed)
    radii = {rho: theta_tilde_outputs(exp, trained, replace(recipe, rho=rho), args.seed) for rho in args.rhos}
    for variant in variants(exp, sam, sgd, radii):
        rows.append(measure(exp, *variant))
    for rate in args.extra_lr:  # the same θ̃ recipes at another fine-tune learning rate
        faster = replace(recipe, learning_rate=rate)
        for optimizer, name in (("sam", "fvm"), ("sgd", "vm")):
            out = theta_tilde_outputs(exp, trained, replace(faster, optimizer=optimizer), args.seed,
                                      cached_only=args.cached_only)
            if out is None:
                continue
            influence = out["candidates"][np.arange(len(exp.train)), exp.train.labels]
            rows += [measure(exp, f"{name}, fine-tune lr {rate}", influence, out["candidates"].argmin(1),
                             float(out["seconds"])),
                     measure(exp, f"{name}-loss, fine-tune lr {rate}", out["loss"], out["probabilities"].argmax(1),
                             float(out["seconds"]))]
    for row in rows:
        row["theta_star_validation_accuracy"] = training["validation_accuracy"]
        row["theta_tilde_validation_accuracy"] = float(sam[0]["validation_accuracy"])
        print(json.dumps(row), flush=True)
    return rows


def write(rows: list[dict], args: argparse.Namespace) -> None:
    only = "; --cached-only: cleanlab, seeds > 0 and --extra-lr rows only where an earlier run computed them" \
        if args.cached_only else ""
    md = ["# Flat-validation variants on one trained model per setting", "", "```", args.command, "```", "",
          f"Run {args.started} on {args.machine}. Data, recipes and seeds as `benchmarks/detection.py` (cpu size); "
          f"validation trusted in every setting; fine-tune lr {args.finetune_lr}, SAM ρ = {args.rho}, "
          f"up to {args.finetune_seeds} fine-tune seeds (they change the batch order of the fine-tune only{only}). "
          "Seconds: the fine-tunes, curvature fits and "
          "scoring of the variant (θ* training excluded); CPU shared, noisy.", ""]
    if args.note:
        md += [args.note, ""]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        part = [r for r in rows if r["setting"] == setting]
        best = max(r["auroc"] for r in part if r["variant"] in BASELINES)
        missing = [m for m in BASELINES if m not in {r["variant"] for r in part}]
        md += [f"## {setting} (θ* validation accuracy {part[0]['theta_star_validation_accuracy']:.3f}, "
               f"θ̃ {part[0]['theta_tilde_validation_accuracy']:.3f}; best baseline AUROC {best:.3f}"
               f"{' (' + ', '.join(missing) + ' not run)' if missing else ''}, "
               f"target {best + 0.02:.3f})", "",
               "| variant | AUROC | AP | R@2% | relabel top-1 | seconds |", "|---|---|---|---|---|---|"]
        md += [f"| {r['variant']} | {r['auroc']:.3f} | {r['ap']:.3f} | {r['recall_at_2pct']:.3f} | "
               f"{r['relabel_top1']:.2f} ({r['relabel_n']}) | {r['seconds']:.1f} |" for r in part]
        md.append("")
    for setting in dict.fromkeys(r["setting"] for r in rows):
        part = [r for r in rows if r["setting"] == setting]
        base = max((r for r in part if r["variant"] in BASELINES), key=lambda r: r["auroc"])
        flagship = next(r for r in part if r["variant"] == "fvm")
        top = max((r for r in part if r["variant"] not in BASELINES), key=lambda r: r["auroc"])

        def verdict(row: dict, base: dict = base) -> str:
            gap = row["auroc"] - base["auroc"] - 0.02
            status = "meets" if gap >= 0 else f"{-gap:.4f} short of"
            return f"`{row['variant']}` {row['auroc']:.4f} ({status} the target)"

        argmax = next(r for r in part if r["variant"] == "fvm-loss")["relabel_top1"]
        md.append(f"**{setting}: best baseline `{base['variant']}` {base['auroc']:.4f}, target +0.02; "
                  f"{verdict(flagship)}; best variant {verdict(top)}; relabel top-1 `fvm` "
                  f"{flagship['relabel_top1']:.3f} vs θ̃'s argmax {argmax:.3f}.**  ")
    OUT.write_text("\n".join(md) + "\n")
    pd.DataFrame(rows).to_csv(OUT.with_suffix(".csv"), index=False)
    write_summary(OUT.parent)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", action="append", required=True)
    parser.add_argument("--finetune-seeds", type=int, default=3)
    parser.add_argument("--rho", type=float, default=FinetuneConfig.rho)
    parser.add_argument("--finetune-lr", type=float, default=FinetuneConfig.learning_rate)
    parser.add_argument("--rhos", type=lambda v: [float(x) for x in v.split(",") if x], default=[],
                        help="extra SAM radii (seed 0) for the ensemble over radii, e.g. 0.02,0.1")
    parser.add_argument("--extra-lr", type=lambda v: [float(x) for x in v.split(",") if x], default=[],
                        help="also score the SAM and SGD θ̃ fine-tuned at these learning rates, e.g. 0.01")
    parser.add_argument("--cached-only", action="store_true",
                        help="cleanlab, fine-tune seeds > 0 and --extra-lr θ̃ only where an earlier run cached them")
    parser.add_argument("--note", default="", help="a paragraph for the table (what the figures show)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--no-write", action="store_true", help="print only (do not rewrite the results table)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.command = "python benchmarks/flagship_variants.py " + " ".join(shlex.quote(a) for a in argv)
    args.started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    args.machine = machine_description("cpu")
    rows = [row for name in args.setting for row in run(name, args)]
    if not args.no_write:
        write(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
