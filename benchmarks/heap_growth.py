"""How the heap of a scoring run over large photos grows, under three ways of handing freed memory back.

    python benchmarks/heap_growth.py                       # 600 photos of 1280×960, --image-size 1024
    python benchmarks/heap_growth.py --photos 300 --repeats 1

Batches of large images, decoded, normalised and freed again and again, fragment glibc's heap. The same
``influence-lens score FOLDER --method loss --backbone backbone.pt --image-size 1024`` run (memory budget
256 MB, so a batch holds a few images) is measured, in a fresh process each, with:

- ``glibc default``: the allocator as it comes (the engine's :class:`engine.sources.HeapGuard` switched off);
- ``128 kB mmap threshold``: every block above 128 kB mapped and unmapped on its own (what the command
  line did before the guard; the dashboard's server still does, :func:`engine.sources.bound_heap_growth`);
- ``HeapGuard``: the engine as shipped, ``malloc_trim`` between batches once the heap has grown.

The photos (smooth random scenes, JPEG quality 90, 4 classes) and the stand-in backbone of
``benchmarks/scale.py`` go to a temporary folder. Peak PSS of the process tree (main + DataLoader
workers) and the main process's peak RSS, sampled every 50 ms. Writes
``benchmarks/results/heap_growth_cpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import _commit, make_backbone, measure  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "heap_growth_cpu.md"
WAYS = {
    "glibc default": "import engine.sources as s; s.HeapGuard.__call__ = lambda self: None",
    "128 kB mmap threshold": "import engine.sources as s; s.HeapGuard.__call__ = lambda self: None; "
                             "s.bound_heap_growth()",
    "HeapGuard": "",
}
RUN = "import sys; {way}\nfrom engine.cli import main\nsys.exit(main())"


def make_photos(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"class_{i % 4}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((1280, 960), Image.BICUBIC).save(path, quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "photos"
        make_photos(folder, args.photos)
        backbone = make_backbone(Path(scratch) / "backbone.pt")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "INFLUENCE_LENS_MEMORY_BUDGET": "256M"}
        for repeat in range(args.repeats):
            for way, code in WAYS.items():
                workspace = Path(scratch) / f"ws-{repeat}-{len(rows)}"
                workspace.mkdir()
                _, seconds, pss, hwm = measure(
                    [sys.executable, "-c", RUN.format(way=code), "score", str(folder), "--method", "loss",
                     "--backbone", str(backbone), "--image-size", "1024", "--val-from-train", "0.1",
                     "--workspace", str(workspace), "--out", str(workspace / "scores.csv"), "--force"], env)
                row = {"way": way, "repeat": repeat + 1, "seconds": round(seconds, 1), "peak_pss_mb": round(pss),
                       "main_peak_rss_mb": round(hwm)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    write_table(rows, args)


def write_table(rows: list[dict], args: argparse.Namespace) -> None:
    lines = [
        "# Heap growth over large photos (`benchmarks/heap_growth.py`)",
        "",
        f"Written by `python benchmarks/heap_growth.py --photos {args.photos} --repeats {args.repeats}` on "
        f"{time.strftime('%Y-%m-%d')} at commit {_commit()}, {platform.machine()}, {os.cpu_count()} cores, CPU only, "
        f"load average {os.getloadavg()[0]:.1f} at the end. `influence-lens score FOLDER --method loss --backbone "
        f"backbone.pt --image-size 1024 --val-from-train 0.1` over {args.photos} JPEGs of 1280×960 with "
        "INFLUENCE_LENS_MEMORY_BUDGET=256M, in a fresh process per row. Peak PSS: main process and DataLoader "
        "workers, shared pages counted once, sampled every 50 ms.",
        "",
        "| way | run | seconds | peak PSS MB | main peak RSS MB |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['way']} | {r['repeat']} | {r['seconds']} | {r['peak_pss_mb']:,} | {r['main_peak_rss_mb']:,} |"
              for r in rows]
    RESULTS.write_text("\n".join(lines) + "\n")
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
