"""Peak host memory of scoring lazily read image files as N grows from 10k to 200k synthetic PNGs.

    python benchmarks/streaming_memory.py                        # 10k, 50k, 200k rows, method loss
    python benchmarks/streaming_memory.py --sizes 10000 50000 --method tracin
    python benchmarks/streaming_memory.py --eager-up-to 50000    # the in-memory loader beside it

The files (32×32 RGB noise PNGs, 10 classes, a ``path,label`` manifest per size) go to a temporary
folder, or ``--pool`` to keep them between runs. One small CNN is trained once on 2,000 of them;
each size is then scored by :func:`engine.streaming.stream_scores` (2 DataLoader workers, chunks of
2,048, scores into a memory-mapped ``.npy``) in a fresh process, so every peak starts clean:

* ``listing MB``: the main process's peak resident set while the manifest is read and checked
  (O(N): one ``Path`` per row while checking, then ~30 bytes per row kept);
* ``main MB``: its peak while scoring; ``worker MB``: the largest worker's peak resident set;
* ``total PSS MB``: main + workers, proportional set size (shared pages counted once), sampled
  every 20 ms: the number to read as "host memory".

``--eager-up-to N`` also runs the in-memory path (``load_dataset`` + ``score_methods``) up to N rows.
One JSON line per run, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `engine` importable

from benchmarks.reports import add_results_arguments, results_file  # noqa: E402
from engine.config import TrainConfig  # noqa: E402
from engine.data import load_dataset  # noqa: E402
from engine.pipeline import score_methods  # noqa: E402
from engine.streaming import ImageFiles, stream_scores  # noqa: E402
from engine.training import train  # noqa: E402

CLASSES = 10
SHAPE = (32, 32, 3)  # CIFAR-sized
TRAIN_ROWS = 2000
TRAIN = TrainConfig(model="small-cnn", epochs=2, checkpoints=2, device="cpu")


def make_pool(pool: Path, n: int, sizes: list[int]) -> None:
    """Files 0..n-1 (those already there are kept) and one manifest of the first N files per size."""
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (pool / f"class_{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = pool / _relative(i)
        image = rng.integers(0, 256, SHAPE, dtype=np.uint8)  # drawn either way: file i is the same every run
        if not path.exists():
            Image.fromarray(image).save(path, compress_level=1)
    for size in sizes:
        manifest = pool / f"manifest_{size}.csv"
        if not manifest.exists():
            manifest.write_text("path,label\n" + "".join(f"{_relative(i)},{i % CLASSES}\n" for i in range(size)))


def _relative(i: int) -> str:
    return f"class_{i % CLASSES}/{i:07d}.png"


def _status_mb(key: str, pid: str = "self") -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key)) / 1024


def _pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            return next(int(line.split()[1]) for line in rollup if line.startswith("Pss:")) / 1024
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return 0.0  # the process ended between the listing and the read


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return out


class PssSampler(threading.Thread):
    """The peak, over 20 ms samples, of this process's PSS plus its children's."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = 0.0, threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self.done.wait(0.02):
            self.peak = max(self.peak, _pss_mb(me) + sum(_pss_mb(c) for c in _children(me)))

    def stop(self) -> float:
        self.done.set()
        self.join()
        return self.peak


def child(args: argparse.Namespace) -> None:
    """One measurement in this fresh process; prints one JSON line."""
    torch.set_num_threads(1)
    trained = torch.load(args.model, weights_only=False)
    start = time.perf_counter()
    sampler = PssSampler()
    sampler.start()
    if args.eager:
        dataset = load_dataset(args.manifest)
        listing = _status_mb("VmHWM")
        score_methods(dataset, [args.method], trained=trained)
        n, main, worker = len(dataset), _status_mb("VmHWM"), 0.0
    else:
        files = ImageFiles.open(args.manifest)
        listing = _status_mb("VmHWM")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # from here on: the scoring's own peak
        stream_scores(files, trained, args.method, Path(args.manifest).with_suffix(".scores.npy"), workers=2)
        n, main = len(files), _status_mb("VmHWM")
        worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    seconds = time.perf_counter() - start
    print(json.dumps({"rows": n, "path": "in-memory" if args.eager else "streamed", "method": args.method,
                      "seconds": round(seconds, 1), "rows_per_s": round(n / seconds, 1),
                      "listing_mb": round(listing, 1), "main_mb": round(main, 1), "worker_mb": round(worker, 1),
                      "total_pss_mb": round(sampler.stop(), 1)}), flush=True)


TITLE = "Peak host memory of streamed scoring"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    parser.add_argument("--method", default="loss", help="a row-local method (loss, margin, tracin-last, tracin)")
    parser.add_argument("--eager-up-to", type=int, default=0, help="also the in-memory path up to this many rows")
    parser.add_argument("--pool", default=None, help="folder for the PNGs (kept); default: a temporary folder")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    add_results_arguments(parser)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with results_file(args, TITLE):
        with tempfile.TemporaryDirectory() as scratch:
            pool = Path(args.pool or scratch)
            start = time.perf_counter()
            make_pool(pool, max(args.sizes), sorted(args.sizes))
            print(json.dumps({"files": max(args.sizes), "shape": SHAPE, "pool": str(pool),
                              "generate_seconds": round(time.perf_counter() - start, 1)}), flush=True)
            torch.set_num_threads(1)
            model = Path(scratch) / "model.pt"
            torch.save(train(ImageFiles.open(pool / f"manifest_{min(args.sizes)}.csv").load(np.arange(TRAIN_ROWS)),
                             TRAIN), model)
            runs = []
            for size in sorted(args.sizes):
                for eager in ([False, True] if size <= args.eager_up_to else [False]):
                    command = [sys.executable, __file__, "--child", "--manifest", str(pool / f"manifest_{size}.csv"),
                               "--model", str(model), "--method", args.method] + (["--eager"] if eager else [])
                    line = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
                    print(line, flush=True)
                    runs.append(json.loads(line.splitlines()[-1]))
        print("\n| rows | path | method | seconds | rows/s | listing MB | main MB | worker MB | total PSS MB |")
        print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
        for r in runs:
            print(f"| {r['rows']:,} | {r['path']} | {r['method']} | {r['seconds']} | {r['rows_per_s']:,.0f} | "
                  f"{r['listing_mb']} | {r['main_mb']} | {r['worker_mb']} | {r['total_pss_mb']} |")


if __name__ == "__main__":
    main()
