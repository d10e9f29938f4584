"""Bring your model, measured side by side: from scratch, frozen backbone, full fine-tune from the weights.

    python benchmarks/pretrain_backbone.py --epochs 6          # the stand-in for a pretrained network
    python benchmarks/own_model.py --weights benchmarks/out/cifar10_train_small_cnn.pt

The weights: the small CNN trained on the 50,000 clean CIFAR-10 *training* images
(``benchmarks/pretrain_backbone.py``); nothing of the CIFAR-10 test set was seen. Two settings, both on
CIFAR-10 *test* images, with a trusted validation set of ``--val-rows`` held out of the rows that are not
known errors (stratified, seed 0, never scored):

- ``real``: the labels as given; ``--rows`` scored rows, every one of the 54 human-validated label errors
  among them (../shared/data/label_errors); relabel top-1 on the correctable ones.
- ``sym20``: ``--rows`` other rows that are not known errors, 20% of their labels flipped symmetrically
  (seed 0); the truth is the flips.

Every method runs through the CLI, ``influence-lens score DATA --method M --val VAL --workspace DIR``,
one workspace per (setting, way) so the methods share the trained model; the ways add
``--weights FILE --freeze backbone`` (only the head is trained on the cached features) or
``--weights FILE --freeze none`` (everything is fine-tuned from the weights). Metrics are computed
here from the written score CSVs. Output: JSON lines on stdout, ``benchmarks/results/own-model.{md,csv}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `benchmarks` importable

from benchmarks.common import (  # noqa: E402
    REPO_ROOT,
    data_root,
    known_errors,
    load_cifar10,
    load_label_errors,
    machine_description,
)
from benchmarks.detection import write_summary  # noqa: E402
from engine.data import Dataset  # noqa: E402
from engine.metrics import detection_metrics, top_k  # noqa: E402
from engine.pipeline import carve_validation, with_injected_noise  # noqa: E402

METHODS = ("loss", "cleanlab", "if-last", "vm-loss", "fvm")
WAYS = ("scratch", "frozen", "finetune")
WORK = REPO_ROOT / "benchmarks" / "out" / "own_model"  # git-ignored: data files, workspaces, score CSVs
OUT = REPO_ROOT / "benchmarks" / "results"
TOP_PERCENT = (1, 2, 5)


def _save(dataset: Dataset, path: Path) -> str:
    np.savez(path, images=dataset.images, labels=dataset.labels, index=dataset.index,
             class_names=np.asarray(dataset.class_names))
    return str(path)


def prepare(args: argparse.Namespace) -> dict[str, dict]:
    """Write the validation set and the two scored sets as .npz; return each setting's truth."""
    root = data_root(args.data_root)
    full = load_cifar10(root, "test")
    errors = known_errors(full, load_label_errors(root, "cifar10"))
    clean_rows = np.flatnonzero(~errors.is_error)
    validation = carve_validation(full.subset(clean_rows), args.val_rows / len(clean_rows), seed=0)[1]
    rest = np.flatnonzero(~np.isin(full.index, validation.index))
    rng = np.random.default_rng(0)
    rest_clean = rng.permutation(rest[~errors.is_error[rest]])
    others = rest_clean[:args.rows - int(errors.is_error.sum())]
    real_rows = np.sort(np.concatenate([np.flatnonzero(errors.is_error), others]))
    noisy_rows = np.sort(rest_clean[args.rows:2 * args.rows])
    WORK.mkdir(parents=True, exist_ok=True)
    real = full.subset(real_rows)
    noisy = with_injected_noise(full.subset(noisy_rows), rate=0.2, kind="symmetric", seed=0)
    return {
        "val": {"path": _save(validation, WORK / "val.npz")},
        "real": {"path": _save(real, WORK / "real.npz"), "index": real.index, "truth": errors.is_error[real_rows],
                 "true_labels": errors.true_labels[real_rows]},
        "sym20": {"path": _save(noisy.dataset, WORK / "sym20.npz"), "index": noisy.dataset.index,
                  "truth": noisy.flipped, "true_labels": noisy.clean_labels},
    }


def way_options(way: str, args: argparse.Namespace) -> list[str]:
    if way == "scratch":
        return ["--epochs", str(args.scratch_epochs)]
    if way == "frozen":
        return ["--weights", args.weights, "--freeze", "backbone", "--epochs", str(args.frozen_epochs)]
    return ["--weights", args.weights, "--freeze", "none", "--epochs", str(args.finetune_epochs),
            "--lr", str(args.finetune_lr)]


def run_method(setting: str, data: dict, val: str, way: str, method: str, args: argparse.Namespace) -> dict:
    out_csv = WORK / f"{setting}-{way}-{method}.csv"
    command = [sys.executable, "-m", "engine.cli", "score", data["path"], "--method", method, "--val", val,
               "--workspace", str(WORK / f"ws-{setting}-{way}"), "--out", str(out_csv), "--model", "small-cnn",
               "--device", "cpu", *way_options(way, args)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    row = {"setting": setting, "way": way, "method": method, "command": shlex.join(command[2:]), "wall_seconds": wall}
    if done.returncode != 0:
        row["error"] = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        return row
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    table = pd.read_csv(out_csv).set_index("index").loc[data["index"]]
    scores, suggested = table["score"].to_numpy(), table["suggested_label"].to_numpy()
    truth, true_labels = data["truth"], data["true_labels"]
    metrics = detection_metrics(scores, truth)
    judged = truth & (true_labels >= 0)
    timings = summary.get("timings", {})
    row.update({"n": len(scores), "positives": int(truth.sum()), "auroc": metrics["auroc"], "ap": metrics["ap"],
                "relabel_top1": float((suggested[judged] == true_labels[judged]).mean()),
                "relabel_n": int(judged.sum()),
                "method_seconds": timings.get("prepare_seconds", 0.0) + timings.get("score_seconds", 0.0),
                "train_seconds": summary.get("train_seconds"), "validation": summary.get("validation")})
    for p in TOP_PERCENT:
        row[f"top{p}pct"] = int(truth[top_k(scores, int(round(len(scores) * p / 100)))].sum())
    return row


def _rows_from_logs(args: argparse.Namespace) -> list[dict]:
    """The rows printed by earlier runs, in table order; a combination in no log becomes a 'not run' row."""
    found = {}
    for log in args.from_logs:
        for line in Path(log).read_text().splitlines():
            row = json.loads(line)
            found[(row["setting"], row["way"], row["method"])] = row
    return [found.get((s, w, m), {"setting": s, "way": w, "method": m, "error": "not run (out of time)"})
            for w in args.ways.split(",") for s in args.settings.split(",") for m in args.methods.split(",")]


def write(rows: list[dict], args: argparse.Namespace) -> None:
    pd.DataFrame(rows).to_csv(OUT / "own-model.csv", index=False)
    md = ["# Bring your model: from scratch, frozen backbone, full fine-tune (CIFAR-10 test images)", "",
          "```", args.command, "```", "",
          f"{'Assembled' if args.from_logs else 'Run'} {args.started} on {args.machine} (each CLI run one torch "
          f"thread); seconds are noisy (shared CPU). Weights: `{args.weights}` "
          f"({args.weights_note}). Ways: scratch {args.scratch_epochs} epochs; frozen backbone, head "
          f"{args.frozen_epochs} epochs; full fine-tune {args.finetune_epochs} epochs at peak lr {args.finetune_lr}. "
          f"Trusted validation: {args.val_rows} held-out clean test rows. Scored: {args.rows} rows per setting "
          "(`real`: all 54 known errors among them; `sym20`: other rows, 20% symmetric flips). "
          "top x% = how many of the positives rank in the top x% (of `positives`); method s = its prepare + "
          "score seconds on the shared trained model; train s = the way's training (once per way).", ""]
    if args.note:
        md += [args.note, ""]
    header = ["setting", "way", "method", "AUROC", "AP", "top 1%", "top 2%", "top 5%", "relabel top-1",
              "method s", "train s"]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r.get("error"):
            md.append(f"| {r['setting']} | {r['way']} | {r['method']} | {r['error']} |" + " |" * 7)
            continue
        md.append(f"| {r['setting']} | {r['way']} | {r['method']} | {r['auroc']:.3f} | {r['ap']:.3f} | "
                  + " | ".join(f"{r[f'top{p}pct']}/{r['positives']}" for p in TOP_PERCENT)
                  + f" | {r['relabel_top1']:.2f} ({r['relabel_n']}) | {r['method_seconds']:.1f} | "
                  f"{r['train_seconds']:.1f} |")
    (OUT / "own-model.md").write_text("\n".join(md) + "\n")
    write_summary(OUT)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="state_dict of the small CNN (pretrain_backbone.py)")
    parser.add_argument("--weights-note", default="small CNN, 50k clean CIFAR-10 train images",
                        help="what the weights are, for the table (e.g. their test accuracy)")
    parser.add_argument("--rows", type=int, default=4000, help="scored rows per setting (default 4000)")
    parser.add_argument("--val-rows", type=int, default=1000)
    parser.add_argument("--settings", default="real,sym20")
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--scratch-epochs", type=int, default=10)
    parser.add_argument("--frozen-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--from-logs", nargs="+", default=None, metavar="LOG",
                        help="no runs: write the table from the JSON lines earlier runs printed (runs split "
                             "across processes); combinations that are in no log are listed as not run")
    parser.add_argument("--note", default="", help="a paragraph for the table (e.g. the commands of split runs)")
    args = parser.parse_args(argv)
    args.command = "python benchmarks/own_model.py " + " ".join(shlex.quote(a) for a in argv)
    args.started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    args.machine = machine_description("cpu")
    if args.from_logs:
        write(_rows_from_logs(args), args)
        return 0
    data = prepare(args)
    rows = []
    for way in args.ways.split(","):  # way by way: the cheap frozen path first when the time is short
        for setting in args.settings.split(","):
            for method in args.methods.split(","):
                row = run_method(setting, data[setting], data["val"]["path"], way, method, args)
                print(json.dumps(row, default=str), flush=True)
                rows.append(row)
                write(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
