"""A stand-in for a pretrained network: the small CNN trained on the 50,000 clean CIFAR-10 training images.

    python benchmarks/pretrain_backbone.py --epochs 6 --out benchmarks/out/cifar10_train_small_cnn.pt

Saves the model's ``state_dict`` (what ``influence-lens score --weights FILE`` reads) and prints one JSON
line with the recipe, the seconds and the accuracy on the CIFAR-10 test set (labels as given). The test
set is never trained on here: the side-by-side benchmark (``benchmarks/own_model.py``) scores it.
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

from benchmarks.common import REPO_ROOT, data_root, load_cifar10  # noqa: E402
from engine.config import TrainConfig  # noqa: E402
from engine.progress import tqdm_progress  # noqa: E402
from engine.training import evaluate, train  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "out" / "cifar10_train_small_cnn.pt"  # git-ignored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--model", default="small-cnn", choices=("small-cnn", "resnet18"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared cores)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = data_root(args.data_root)
    train_set, test_set = load_cifar10(root, "train"), load_cifar10(root, "test")
    config = replace(TrainConfig(model=args.model, device=args.device), epochs=args.epochs).validate()
    start = time.perf_counter()
    trained = train(train_set, config, progress=tqdm_progress())
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in trained.model.state_dict().items()}, out)
    print(json.dumps({"weights": str(out), "model": trained.model_name, "epochs": args.epochs, "n": len(train_set),
                      "seconds": round(seconds, 1), "train_accuracy": trained.history[-1]["accuracy"],
                      "test_accuracy": evaluate(trained, test_set), "history": trained.history}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
