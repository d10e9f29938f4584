"""Review depth, validated where the truth is known: estimated vs. true precision along a ranking.

    python benchmarks/review_depth.py --setting all                 # benchmarks/results/review-depth.md
    python benchmarks/review_depth.py --setting digits-sym20 --quick  # a smoke run, to benchmarks/out/

For each setting (the data, truth and recipe of ``benchmarks/detection.py``, reused, not copied) θ* is
trained once and scored with fvm-loss, cleanlab and loss. ``engine.guidance.estimate_review_depth``
then runs on each ranking with each source of P(label wrong): θ̃ (fvm-loss's validation minimum),
cleanlab's K-fold held-out probabilities, and θ* itself (in-sample). Measured against the truth:
precision at 1/2/5/10% depth, the noise rate, the rows above the "review down to here" line; then a
reviewer decides the top 2% with the true answers and the estimate is made again from those decisions
(the estimated total after review). ``review_estimate`` (the product's choice of source) is reported too,
with cleanlab's ``num_label_issues`` beside it.

On the real settings the truth is the human-validated errors only (reviewers saw cleanlab's candidates,
not every image), so the true noise rate there is a lower bound.
Output: one JSON line per measurement on stdout, a markdown table per setting on stdout and in
``<out>/review-depth[-quick].md``; progress bars on stderr.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `benchmarks` importable

from benchmarks.common import (  # noqa: E402
    cell,
    comma_list,
    data_root,
    emit,
    machine_description,
    markdown_table,
)
from benchmarks.detection import DEFAULT_OUT, QUICK_OUT, SIZES, Experiment, build_experiment, detect, train_base  # noqa: E402
from engine.errors import InfluenceLensError, OptionError  # noqa: E402
from engine.guidance import (  # noqa: E402
    cleanlab_issue_count,
    estimate_review_depth,
    label_error_probability,
    noise_aware_error_probability,
    offset_matching_total,
    review_estimate,
)
from engine.metrics import DEPTH_FRACTIONS  # noqa: E402
from engine.progress import tqdm_progress  # noqa: E402
from engine.training import predict  # noqa: E402

SETTINGS = ("digits-sym20", "digits-pair20", "mnist-real", "cifar-real", "cifar-sym20")
METHODS = ("fvm-loss", "cleanlab", "loss")
RANKINGS = ("fvm-loss", "cleanlab", "loss")
ALL_SOURCES_RANKINGS = ("fvm-loss", "cleanlab")  # every source on these; only the product's default on loss
REVIEWED_FRACTION = 0.02


def _depth(n: int, fraction: float) -> int:
    return max(1, math.ceil(fraction * n))


def measure(exp: Experiment, ranking_scores: np.ndarray, error_probability: np.ndarray | None = None,
            offset: float = 0.0, *, results=None, ranked_by: str = "", trained_probabilities=None) -> dict:
    """Estimated vs. true along one ranking; before and after a reviewer decides its top 2%.

    With ``results`` the product's own entry point (``review_estimate``) picks the source and offset.
    """
    truth = exp.is_noisy
    n = len(truth)

    def estimate(**reviewed):
        if results is not None:
            return review_estimate(results, ranked_by, exp.train.labels, trained_probabilities, **reviewed)
        return estimate_review_depth(ranking_scores, error_probability, prior_offset=offset, **reviewed)

    before = estimate()
    row = {"n": n, "true_total": int(truth.sum()), "true_rate": float(truth.mean()),
           "est_total": before.expected_total, "est_rate": before.expected_noise_rate,
           "stop_depth": before.stop_depth,
           "true_precision_above_stop": float(truth[before.order[:before.stop_depth]].mean())
           if before.stop_depth else float("nan"), "source": before.source}
    for fraction in DEPTH_FRACTIONS:
        d = _depth(n, fraction)
        row[f"est_p{fraction:.0%}"] = before.precision_at(d)
        row[f"true_p{fraction:.0%}"] = float(truth[before.order[:d]].mean())
    reviewed = before.order[:_depth(n, REVIEWED_FRACTION)]
    after = estimate(reviewed_rows=reviewed, reviewed_is_error=truth[reviewed])
    row.update({"reviewed": after.reviewed, "found": after.found, "est_total_after_review": after.expected_total,
                "calibration_after_review": [round(v, 3) for v in after.calibration],
                "est_p10%_after_review": after.precision_at(_depth(n, 0.10))})
    if before.cleanlab_total is not None:
        row["cleanlab_total"] = before.cleanlab_total
    return row


def run_setting(name: str, size_name: str, args: argparse.Namespace, root) -> list[dict]:
    progress = tqdm_progress()
    base = {"setting": name, "size": size_name}
    exp = build_experiment(name, SIZES[size_name], root, seed=args.seed, device=args.device)
    trained, training_row = train_base(exp, progress)
    rows = [emit({**base, **training_row})]
    results = {}
    for method in METHODS:
        detection_row, results[method] = detect(exp, trained, method, progress)
        rows.append(emit({**base, **{k: detection_row[k] for k in ("kind", "method", "auroc", "ap", "seconds")}}))
    theta_star = predict(trained.model, trained.task, exp.train.images, trained.device).probabilities
    probabilities = {"fvm-loss": results["fvm-loss"].arrays["probabilities"],
                     "cleanlab": results["cleanlab"].arrays["probabilities"]}
    labels = exp.train.labels
    sources = {  # name → (1 − p_y, logit offset), the offsets as engine.guidance.error_probability_source sets them
        "θ̃ (fvm-loss), 1 − p_y": (label_error_probability(probabilities["fvm-loss"], labels), 0.0),
        "θ̃ (fvm-loss), noise-aware": (noise_aware_error_probability(probabilities["fvm-loss"], labels), 0.0),
        "cleanlab held-out, 1 − p_y": (label_error_probability(probabilities["cleanlab"], labels), 0.0),
        "θ* (in-sample), 1 − p_y": (label_error_probability(theta_star, labels), 0.0),
    }
    cleanlab_raw = sources["cleanlab held-out, 1 − p_y"][0]
    sources["cleanlab held-out, offset to cleanlab's count"] = (
        cleanlab_raw, offset_matching_total(cleanlab_raw, cleanlab_issue_count(labels, probabilities["cleanlab"])))
    for ranked_by in RANKINGS:
        scores = results[ranked_by].scores
        if ranked_by in ALL_SOURCES_RANKINGS:
            for source, (prob, offset) in sources.items():
                rows.append(emit({**base, "kind": "review-depth", "ranking": ranked_by,
                                   **measure(exp, scores, prob, offset), "source": source}))
        row = measure(exp, scores, results=results, ranked_by=ranked_by, trained_probabilities=theta_star)
        rows.append(emit({**base, "kind": "review-depth", "ranking": ranked_by, **row,
                           "source": f"default: review_estimate ({row['source']})"}))
    return rows


# ---- tables ----------------------------------------------------------------------------------

def _pair(estimated: float, true: float, digits: int = 2) -> str:
    return f"{cell(estimated, digits)} / {cell(true, digits)}"


def setting_table(rows: list[dict]) -> str:
    """One markdown table of a setting's review-depth rows (estimated / true in each cell)."""
    table = []
    for r in (r for r in rows if r["kind"] == "review-depth"):
        entry = {"ranking": r["ranking"], "P(wrong) from": r["source"]}
        entry.update({f"P@{f:.0%}": _pair(r[f"est_p{f:.0%}"], r[f"true_p{f:.0%}"]) for f in DEPTH_FRACTIONS})
        entry["noise rate"] = f"{r['est_rate']:.2%} / {r['true_rate']:.2%}"
        entry["total"] = f"{r['est_total']:.0f} / {r['true_total']}"
        entry["stop depth (true P above)"] = f"{r['stop_depth']} ({cell(r['true_precision_above_stop'])})"
        entry[f"total after reviewing top {REVIEWED_FRACTION:.0%} (found)"] = \
            f"{r['est_total_after_review']:.0f} ({r['found']}/{r['reviewed']})"
        table.append(entry)
    return markdown_table(pd.DataFrame(table))


def report(rows: list[dict], args: argparse.Namespace) -> str:
    md = ["# Review depth: estimated vs. true", "", "```", args.command, "```", "",
          f"Run {args.started} on {args.machine}.", "",
          "Each cell is *estimated / true*. P@x% = precision of the top x% of the ranking; noise rate and total "
          "over all training rows; stop depth = the estimator's \"review down to here\" line (marginal precision "
          "≥ 50%) with the true precision above it; the last column re-estimates the total after a reviewer "
          f"decided the top {REVIEWED_FRACTION:.0%} of the ranking with the true answers (errors found / rows "
          "reviewed). *default* is `review_estimate`, the product's own choice of source. On the real settings "
          "the truth is the human-validated errors only, a lower bound on the true noise.", ""]
    for name in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == name]
        training = next(r for r in mine if r["kind"] == "training")
        detections = ", ".join(f"{r['method']} {r['auroc']:.3f}" for r in mine if r["kind"] == "detection")
        cleanlab = next((r["cleanlab_total"] for r in mine if "cleanlab_total" in r), None)
        truth = next(r for r in mine if r["kind"] == "review-depth")
        accuracy = f", test {training['test_accuracy']:.3f}" if "test_accuracy" in training else ""
        md += [f"## `{name}` ({truth['n']:,} rows, {truth['true_total']} true errors, "
               f"{truth['true_rate']:.2%})", "",
               f"θ*: {training['model']}, {training['epochs']} epochs, train accuracy "
               f"{training['train_accuracy']:.3f}, validation {training['validation_accuracy']:.3f}{accuracy}. "
               f"AUROC: {detections}. cleanlab `num_label_issues`: {cleanlab} (truth {truth['true_total']}).", "",
               setting_table(mine), ""]
    return "\n".join(md)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", action="append", required=True,
                        help=f"one of {', '.join(SETTINGS)}, or all (repeatable, or comma-separated)")
    parser.add_argument("--quick", action="store_true", help="detection.py's quick sizes (written to benchmarks/out/)")
    parser.add_argument("--data-root", default=None, help="the shared data folder (default ../shared/data)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed for subsets, splits, noise and training")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared cores)")
    parser.add_argument("--out", default=None, help="folder for review-depth.md (default benchmarks/results, "
                        "or benchmarks/out with --quick)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    size_name = "quick" if args.quick else "cpu"
    out = Path(args.out or (QUICK_OUT if args.quick else DEFAULT_OUT))
    args.command = "python benchmarks/review_depth.py " + " ".join(shlex.quote(a) for a in argv)
    args.started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    args.machine = machine_description(args.device)
    try:
        names = comma_list(args.setting)
        names = list(SETTINGS) if "all" in names else list(dict.fromkeys(names))
        for name in names:
            if name not in SETTINGS:
                raise OptionError("setting", name, (*SETTINGS, "all"))
        rows = []
        for name in names:
            rows += run_setting(name, size_name, args, lambda: data_root(args.data_root))
    except InfluenceLensError as exc:
        print(f"review_depth: error: {exc}", file=sys.stderr)
        return 2
    text = report(rows, args)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"review-depth{'-quick' if args.quick else ''}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
