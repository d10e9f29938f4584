"""Peak host memory of loading a folder of large JPEG photos with ``--image-size``.

    python benchmarks/image_size_memory.py                            # 100 and 500 photos of 4000×3000, S=224
    python benchmarks/image_size_memory.py --counts 500 --size 64 --width 4000 --height 3000

The photos (smooth synthetic scenes, 10 distinct ones copied under 10 class folders) go to a
temporary folder. Each count is loaded by ``load_dataset(folder, image_size=S)`` in a fresh process,
so every peak starts clean: the files are decoded one at a time (JPEG draft scaling, then the shorter
side to S and a centre crop), and only the S×S copies are kept. ``peak MB before loading`` is the
process after its imports (the interpreter, numpy, Pillow, torch); ``peak MB`` after loading.
``full-size GB`` is what the same photos would take decoded whole (N×H×W×3 bytes), computed, not
run. One JSON line per run, then a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `benchmarks` importable

from benchmarks.reports import add_results_arguments, results_file  # noqa: E402

CLASSES = 10


def make_photos(folder: Path, count: int, width: int, height: int) -> None:
    """``count`` JPEGs in ``CLASSES`` class folders: 10 smooth scenes (low-frequency colour noise
    upsampled, so they compress like photos), each copied under new names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    scenes = []
    for s in range(CLASSES):
        small = rng.integers(0, 256, (height // 100, width // 100, 3), dtype=np.uint8)
        path = folder / f"scene_{s}.jpg"
        Image.fromarray(small).resize((width, height), Image.BICUBIC).save(path, quality=90)
        scenes.append(path)
    for i in range(count):
        target = folder / f"class_{i % CLASSES}" / f"photo_{i:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copyfile(scenes[i % CLASSES], target)


def measure(folder: Path, size: int) -> dict:
    """Run in a fresh process: load the folder at ``size`` and report the peak resident set."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from engine.data import load_dataset

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the interpreter, numpy, torch, Pillow
    start = time.perf_counter()
    dataset = load_dataset(folder, image_size=size)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": len(dataset), "shape": list(dataset.image_shape), "seconds": round(seconds, 1),
            "before_mb": round(before, 1), "peak_mb": round(peak, 1),
            "kept_mb": round(dataset.images.nbytes / 2**20, 1)}


TITLE = "Peak memory of loading large JPEG photos with --image-size"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: the child process
    add_results_arguments(parser)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.size)))
        return
    with results_file(args, TITLE):
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for count in args.counts:
                folder = Path(tmp) / f"n{count}"
                make_photos(folder, count, args.width, args.height)
                child = subprocess.run([sys.executable, __file__, "--measure", str(folder), "--size", str(args.size)],
                                       capture_output=True, text=True, check=True)
                row = {"photos": count, "photo": f"{args.width}×{args.height}", "image_size": args.size,
                       **json.loads(child.stdout.strip().splitlines()[-1]),
                       "full_size_gb": round(count * args.width * args.height * 3 / 2**30, 1)}
                print(json.dumps(row), flush=True)
                rows.append(row)
        print("| photos | photo | --image-size | seconds | peak MB before loading | peak MB | kept MB | full-size GB |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['photos']} | {r['photo']} | {r['image_size']} | {r['seconds']} | {r['before_mb']} | "
                  f"{r['peak_mb']} | {r['kept_mb']} | {r['full_size_gb']} |")


if __name__ == "__main__":
    main()
