"""The ``influence-lens`` command: list methods, score a dataset headless, retrain, start the app.

User errors (bad files, bad options) exit with status 2 and one line on stderr; progress goes to
stderr; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from engine.config import FREEZE_CHOICES, TrainConfig
from engine.data import NOISE_KINDS, Dataset
from engine.device import DEVICE_NAMES
from engine.distributed import LOCAL, Distributed, from_torchrun
from engine.errors import InfluenceLensError
from engine.guidance import review_estimate, scoring_advice
from engine.launch import run as run_streamlit
from engine.launch import streamlit_command
from engine.memory import check_loading, check_training
from engine.metrics import detection_metrics
from engine.models import MODEL_NAMES
from engine.pipeline import (
    carve_validation_fraction,
    read_decisions,
    result_table,
    retrain_comparison,
    score_methods,
    with_class_names,
)
from engine.progress import MAX_ESTIMATED_HOURS, close_progress_bars, no_progress, time_limited, tqdm_progress
from engine.runs import RunData, RunSettings, load_run_data, score_into
from engine.safe_files import check_folder, check_output, remember_written, write_atomically
from engine.scorers import available_methods, scorer_class
from engine.scorers.flat_validation import CURVATURES
from engine.stages import StageStore
from engine.training import Predictions
from engine.workspace import Workspace

REVIEW_DEPTHS_PERCENT = (1, 2, 5, 10)  # depths at which `score` reports the estimated precision


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed for training and noise (default %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate,
                        help="peak learning rate of the schedule (default %(default)s)")
    parser.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICE_NAMES)}")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="CPU threads while training, part of the recipe: the same number gives the same "
                             "weights, 1 the same on every machine (default: this machine's cores, at most 8: "
                             "%(default)s, as the dashboard)")
    parser.add_argument("--model", default="auto", help=f"one of {', '.join(MODEL_NAMES)}, or timm:NAME")
    parser.add_argument("--noise-rate", type=float, default=None, help="inject this fraction of label noise first")
    parser.add_argument("--noise-kind", default="symmetric", help=f"one of {', '.join(NOISE_KINDS)}")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="leave out unreadable images (and report them) instead of stopping")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing --out file that influence-lens did not write, start a training "
                             f"estimated at more than {MAX_ESTIMATED_HOURS:g} hours, and try a run estimated to need "
                             "more memory than the machine has")
    _add_start_options(parser)


def _add_start_options(parser: argparse.ArgumentParser) -> None:
    """Bring your model (engine.start, engine.frozen): start from weights, a backbone, timm, or embeddings."""
    group = parser.add_argument_group("bring your model")
    group.add_argument("--weights", default=None, metavar="FILE",
                       help="a state_dict (.pt or .safetensors) for --model small-cnn/resnet18 (or a timm model)")
    group.add_argument("--backbone", default=None, metavar="FILE",
                       help="a TorchScript module mapping N×C×H×W images to N×D features; a linear head goes on top")
    group.add_argument("--embeddings", default=None, metavar="FILE.npy",
                       help="N×D features already computed, row i for the sample of index i: a head is trained on them")
    group.add_argument("--freeze", choices=FREEZE_CHOICES, default=None,
                       help="backbone (default with a start): features once, train the head alone; none: fine-tune all")
    group.add_argument("--pretrained", action="store_true", help="--model timm:NAME: timm's pretrained weights")
    group.add_argument("--image-size", type=int, default=None, metavar="S",
                       help="resize at load: shorter side to S, centre crop (default: the backbone's input; "
                            "images as they are for the built-in models)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="influence-lens", description="Find mislabeled training images.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="print the available scoring methods, one per line")

    score = sub.add_parser("score", help="train on TRAIN and score every sample")
    score.add_argument("train", metavar="TRAIN", help="an .npz, an image folder, a CSV manifest, or 'sample'")
    score.add_argument("--method", required=True, help="a name from 'influence-lens methods'")
    score.add_argument("--val", default=None, help="a trusted validation set (needed by vm / fvm)")
    score.add_argument("--val-from-train", type=float, default=None, metavar="FRACTION",
                       help="carve an (untrusted) validation set out of TRAIN")
    score.add_argument("--curvature", choices=CURVATURES, default=None,
                       help="vm / fvm: the head's GGN (default: exact, EK-FAC above a size limit), ekfac-last (the "
                            "head's EK-FAC) or ekfac (EK-FAC over the whole network)")
    score.add_argument("--out", default=None, help="CSV to write (default: <method>_scores.csv)")
    score.add_argument("--distributed", action="store_true",
                       help="under torchrun: train with DDP and score a shard of the rows per rank; rank 0 writes")
    score.add_argument("--workspace", default=None, metavar="DIR",
                       help="a workspace folder (as for 'dashboard'): the run is saved there stage by stage, so a "
                            "killed run resumes where it stopped, a finished one is loaded instead of recomputed, "
                            "and the dashboard opens it")
    _add_training_options(score)

    retrain = sub.add_parser("retrain", help="retrain with review decisions applied and compare test accuracy")
    retrain.add_argument("train", metavar="TRAIN")
    retrain.add_argument("--decisions", required=True, help="CSV with index,action,new_label")
    retrain.add_argument("--test", required=True, help="a clean test set")
    _add_training_options(retrain)

    dash = sub.add_parser("dashboard", help="start the Streamlit dashboard")
    dash.add_argument("--data", default="sample", help="dataset to open (default: the embedded sample)")
    dash.add_argument("--port", type=int, default=8501)
    dash.add_argument("--workspace", default=None,
                      help="folder of the review workspaces (default: ./workspaces); other --server.* / --theme.* "
                           "options go to streamlit")
    dash.add_argument("--data-root", default=None, metavar="DIR",
                      help="open data only under DIR (links resolved); needed with --server.address other than "
                           "127.0.0.1, where anyone on the network can use the dashboard")
    return parser


def _config(args: argparse.Namespace) -> TrainConfig:
    return replace(TrainConfig(), epochs=args.epochs, seed=args.seed, device=args.device, model=args.model,
                   learning_rate=args.lr, weights=args.weights, backbone=args.backbone, embeddings=args.embeddings,
                   freeze=args.freeze, pretrained=args.pretrained, threads=args.threads).validate()


def _run_settings(args: argparse.Namespace) -> RunSettings:
    """The run the options describe, in the runs layer's terms (the CLI and the dashboard load alike)."""
    config = _config(args)  # its own checks first (e.g. --epochs 0), which the run settings would default away
    return RunSettings(data=args.train, validation=getattr(args, "val", None),
                       val_from_train=getattr(args, "val_from_train", None), test=getattr(args, "test", None),
                       noise_rate=args.noise_rate or 0.0, noise_kind=args.noise_kind, epochs=config.epochs,
                       seed=config.seed, device=config.device, learning_rate=config.learning_rate, model=config.model,
                       curvature=getattr(args, "curvature", None), weights=config.weights, backbone=config.backbone,
                       embeddings=config.embeddings, freeze=config.freeze, pretrained=config.pretrained,
                       image_size=args.image_size, threads=config.threads).validate()


def _load(settings: RunSettings, args: argparse.Namespace) -> RunData:
    """:func:`engine.runs.load_run_data`, saying on stderr what loading left out or changed; the memory the
    images and the training will take checked before each asks for it (``--force`` tries anyway)."""
    if settings.image_size is not None:
        for spec in (settings.data, settings.validation, settings.test):
            if spec is not None:
                check_loading(spec, settings.image_size, force=args.force)
    data = load_run_data(settings, skip_unreadable=args.skip_unreadable, listings=getattr(args, "workspace", None))
    check_training(data.train, settings.train_config(), [args.method] if hasattr(args, "method") else [],
                   force=args.force)
    _report_loading(args.train, data.full_train)
    for spec, dataset in ((settings.validation, data.validation), (settings.test, data.test)):
        if spec is not None and dataset is not None:
            _report_loading(spec, dataset)
    for note in data.notes:
        print(f"influence-lens: {note}", file=sys.stderr)
    _check_truth(data.flipped, args)
    return data


def _report_loading(spec: str, dataset) -> None:
    """What loading left out (unreadable files) or changed (resized images), on stderr."""
    if dataset.skipped:
        print(f"influence-lens: skipped {len(dataset.skipped)} unreadable image(s) in {spec}:", file=sys.stderr)
    for problem in dataset.skipped:
        print(f"influence-lens: skipped {problem}", file=sys.stderr)
    for note in dataset.notes:
        print(f"influence-lens: {note}", file=sys.stderr)


def _output_path(args: argparse.Namespace) -> Path:
    """Where the scores go, checked before any work so a long run cannot fail (or hang) at the end."""
    if args.val is not None and args.val_from_train is not None:
        raise InfluenceLensError("--val and --val-from-train both give a validation set; use one of them")
    inputs = _inputs(args)
    if args.workspace is not None:
        check_folder(args.workspace, inputs)
    return check_output(args.out or f"{args.method}_scores.csv", inputs, force=args.force)


INPUT_OPTIONS = {"train": "TRAIN", "val": "--val", "test": "--test", "decisions": "--decisions",
                 "weights": "--weights", "backbone": "--backbone", "embeddings": "--embeddings"}


def _inputs(args: argparse.Namespace) -> list[str | None]:
    """Every file or folder named on the command line that the run reads: none of them is ever written."""
    for name, option in INPUT_OPTIONS.items():
        if getattr(args, name, None) is not None and not str(getattr(args, name)).strip():
            wanted = ("an .npz, an image folder or a CSV manifest" + (", or 'sample'" if name == "train" else "")
                      if name in ("train", "val", "test") else "the file")
            raise InfluenceLensError(f"{option} is empty: give a path ({wanted})")
    return [getattr(args, name, None) for name in INPUT_OPTIONS]


def _progress(args: argparse.Namespace):
    """The CLI's progress bars; without ``--force`` a training estimated beyond the limit stops early."""
    return tqdm_progress() if args.force else time_limited(tqdm_progress())


def _check_truth(flipped: np.ndarray | None, args: argparse.Namespace) -> None:
    """Detection metrics need flipped and clean rows: refuse a noise rate that leaves none of either."""
    if flipped is not None and (flipped.all() or not flipped.any()):
        raise InfluenceLensError(f"--noise-rate {args.noise_rate} flips {int(flipped.sum())} of {len(flipped)} "
                                 "labels; choose a rate that flips some labels and leaves some clean")


def _method_settings(args: argparse.Namespace) -> dict:
    """The scorer settings that options change (``--curvature``), checked before any training."""
    if args.curvature is None:
        return {}
    defaults = scorer_class(args.method).Settings()
    if not hasattr(defaults, "curvature"):
        raise InfluenceLensError(f"--curvature applies to vm and fvm, not to {args.method!r} (influence "
                                 "functions at the trained model: pick if-last or if-ekfac)")
    return {args.method: replace(defaults, curvature=args.curvature)}


def _score(args: argparse.Namespace) -> dict | None:
    scorer_class(args.method)  # "unknown method" and the list, before the method names any file
    if args.val_from_train is not None:
        carve_validation_fraction(args.val_from_train)
    out = _output_path(args)
    settings = _run_settings(args)
    method_settings = _method_settings(args)  # refuse a --curvature the method does not have, before any work
    config = settings.train_config()
    distributed = from_torchrun(config.device) if args.distributed else LOCAL
    start = time.perf_counter()
    data = _load(settings, args)
    if args.workspace is not None:
        return _score_in_workspace(args, settings, data, out, start, distributed)
    run = score_methods(data.train, [args.method], validation=data.validation,
                        validation_trusted=data.validation_trusted, config=config, settings=method_settings,
                        progress=_progress(args) if distributed.is_main else no_progress, distributed=distributed)
    if not distributed.is_main:
        return None  # rank 0 writes the one merged result
    table = run.table(args.method, data.flipped)
    _write_scores(table, out, data.train)
    trained = run.trained
    summary = _summary(args, config, out, start, run.results[args.method], n=len(data.train),
                       device=str(trained.device), model=trained.model_name, validation=data.validation,
                       trusted=data.validation_trusted, flipped=data.flipped, train_seconds=run.train_seconds)
    summary["review"] = _review(run.results, args.method, data.train.labels, run.context.predictions.probabilities,
                                trusted_validation=data.validation_trusted)
    return _with_advice(summary, scoring_advice(data.train, table, validation=data.validation,
                                                trusted=data.validation_trusted, info=run.results[args.method].info,
                                                history=trained.history, training_notes=trained.notes,
                                                uses_validation=scorer_class(args.method).requires_validation))


def _score_in_workspace(args: argparse.Namespace, settings: RunSettings, data: RunData, out: Path,
                        start: float, distributed: Distributed) -> dict | None:
    """``score --workspace``: the dashboard's resumable run (:func:`engine.runs.score_into`), one method;
    under torchrun every rank scores and keeps stages in the folder, rank 0 writes the workspace."""
    workspace = Workspace.for_data(settings.data_key(), args.workspace) if distributed.is_main else None
    stages = StageStore.in_workspace_folder(args.workspace)
    key, _ = score_into(workspace, settings, data, [args.method], stages=stages, distributed=distributed,
                        progress=_progress(args) if distributed.is_main else no_progress)
    if not distributed.is_main:
        return None  # rank 0 writes the one merged result
    results, arrays = workspace.results(key), workspace.arrays(key)
    result = results[args.method]
    table = result_table(data.train, result, arrays["logits"].argmax(1), data.flipped)
    _write_scores(table, out, data.train)
    training = workspace.report(key, "training")
    log = stages.summary() if stages.log else {"reused": ["result"], "computed": []}
    for kind in ("reused", "computed"):
        if log[kind]:
            print(f"influence-lens: {kind} {', '.join(log[kind])}", file=sys.stderr)
    summary = _summary(args, settings.train_config(), out, start, result, n=len(data.train),
                       device=training["device"], model=training["model"], validation=data.validation,
                       trusted=data.validation_trusted, flipped=data.flipped, train_seconds=training["seconds"])
    summary["workspace"] = {"file": str(workspace.path), "run": key, "stages": log}
    summary["review"] = _review(results, args.method, data.train.labels,
                                Predictions(arrays["logits"].astype(np.float64), arrays["features"]).probabilities,
                                trusted_validation=data.validation_trusted)
    return _with_advice(summary, scoring_advice(data.train, table, validation=data.validation,
                                                trusted=data.validation_trusted, info=result.info,
                                                history=training["history"], training_notes=training.get("notes"),
                                                uses_validation=scorer_class(args.method).requires_validation))


def _review(results: dict, method: str, labels: np.ndarray, trained_probabilities: np.ndarray, *,
            trusted_validation: bool = True) -> dict:
    """How deep to review this ranking (:func:`engine.guidance.review_estimate`), for the JSON summary."""
    estimate = review_estimate(results, method, labels, trained_probabilities, trusted_validation=trusted_validation)
    depths = {f"{p}%": max(1, round(len(labels) * p / 100)) for p in REVIEW_DEPTHS_PERCENT}
    return {"stop_depth": estimate.stop_depth, "expected_label_errors": round(estimate.expected_total, 1),
            "expected_noise_rate": round(estimate.expected_noise_rate, 4), "probabilities_from": estimate.source,
            "estimated_precision": {name: round(estimate.precision_at(d), 4) for name, d in depths.items()}}


def _with_advice(summary: dict, advice: list) -> dict:
    """Print each misuse warning on stderr (it never stops the run) and list them in the JSON."""
    for item in advice:
        print(f"influence-lens: warning: {item.message}", file=sys.stderr)
    summary["warnings"] = [{"code": a.code, "message": a.message} for a in advice]
    return summary


def _write_scores(table, out: Path, train_set: Dataset) -> None:
    """The table, with each row's file path beside its index when the data came from files."""
    table = with_class_names(table, train_set.class_names)  # folder classes 0, 1, 10, 2: the names beside
    if train_set.paths is not None:
        path_of = dict(zip(train_set.index.tolist(), train_set.paths, strict=True))
        table.insert(1, "path", [path_of[i] for i in table["index"].tolist()])
    write_atomically(out, lambda handle: table.to_csv(handle, index=False))
    remember_written(out)  # a later run may replace it while it is unchanged (annotated: not without --force)


def _summary(args: argparse.Namespace, config: TrainConfig, out: Path, start: float, result, *, n: int, device: str,
             model: str, validation, trusted: bool, flipped: np.ndarray | None, train_seconds: float) -> dict:
    """The JSON line ``score`` prints last."""
    summary = {"method": args.method, "n": n, "seconds": round(time.perf_counter() - start, 3), "device": device,
               "model": model, "epochs": config.epochs, "threads": config.threads, "out": str(out)}
    if validation is not None:
        summary["validation"] = {"n": len(validation), "trusted": trusted}
    if flipped is not None:
        metrics = detection_metrics(result.scores, flipped)
        summary.update({k: round(metrics[k], 6) for k in ("auroc", "ap", "precision_at_k")})
    summary.update({"settings": result.settings, "timings": {k: round(v, 3) for k, v in result.timings.items()},
                    "info": result.info, "train_seconds": round(train_seconds, 3)})
    return summary


def _retrain(args: argparse.Namespace) -> dict:
    _inputs(args)
    settings = _run_settings(args)
    data = _load(settings, args)
    decisions = read_decisions(args.decisions, data.full_train)
    return retrain_comparison(data.full_train, decisions, data.test, config=settings.train_config(),
                              progress=_progress(args))


def _dashboard(args: argparse.Namespace, streamlit_options: list[str]) -> int:
    command, notes = streamlit_command(data=args.data, port=args.port, workspace=args.workspace,
                                       data_root=args.data_root, extra=streamlit_options)
    for note in notes:
        print(f"influence-lens: {note}", file=sys.stderr)
    return run_streamlit(command)


def _resume_hint(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves: with a workspace, the stages saved so far (the same command resumes)."""
    command = " ".join(shlex.quote(a) for a in ["influence-lens", *(args.argv or [])])
    if getattr(args, "workspace", None) is not None:
        return f"resume with the same command (the stages saved in {args.workspace} are reused): {command}"
    if args.command == "retrain":
        return f"nothing was written; run it again: {command}"
    return (f"nothing was written; resume with --workspace DIR to keep each stage as it finishes: "
            f"{command} --workspace DIR")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # `dashboard` passes streamlit's own --server.* / --theme.* options (and their values) through
    passed = args.command == "dashboard" and all(e.startswith(("--server.", "--theme.")) or not e.startswith("-")
                                                 for e in extra)
    if extra and not passed:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "methods":
            print("\n".join(available_methods()))
            return 0
        if args.command == "dashboard":
            return _dashboard(args, extra)
        summary = _score(args) if args.command == "score" else _retrain(args)
    except KeyboardInterrupt:
        close_progress_bars()
        print(f"influence-lens: interrupted; {_resume_hint(args)}", file=sys.stderr)
        return 130  # the shell's 128 + SIGINT
    except InfluenceLensError as exc:
        close_progress_bars()
        print(f"influence-lens: error: {exc}", file=sys.stderr)
        return 2
    if summary is not None:
        print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
