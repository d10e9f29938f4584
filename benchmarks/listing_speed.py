"""Listing a manifest of many photos: every header read, or the headers remembered in a workspace folder.

    python benchmarks/listing_speed.py --pool /work/scale_pool --sizes 25000 100000

Uses the photos and manifests ``benchmarks/scale.py`` writes (``--pool``, its default folder unless
given). Each row is ``load_dataset(manifest, lazy=True, ...)`` in a fresh process, as the command line
and the dashboard list a run's data: ``every header`` without a workspace folder (each file opened and
its header parsed), ``first, remembering`` with a new workspace folder (the same, plus writing
``listings/``), ``again, remembered`` a second time with that folder (each file stat'ed, no header
read): what opening a scored run in the dashboard, or a retrain, costs. The files' pages are in the
operating system's cache in every row (the photos were just written or read). Writes
``benchmarks/results/listing_speed_cpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import _commit  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "listing_speed_cpu.md"
LOAD = """
import json, resource, sys, time
from engine.data import load_dataset
start = time.perf_counter()
dataset = load_dataset(sys.argv[1], lazy=True, listings=sys.argv[2] or None)
print(json.dumps({"rows": len(dataset), "seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def load(manifest: Path, listings: str) -> dict:
    done = subprocess.run([sys.executable, "-c", LOAD, str(manifest), listings], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default=str(ROOT / "benchmarks" / "out" / "scale"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[25_000, 100_000])
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        manifest = Path(args.pool) / f"manifest_{size}.csv"
        if not manifest.is_file():
            raise SystemExit(f"{manifest}: not found; run benchmarks/scale.py --pool {args.pool} first")
        with tempfile.TemporaryDirectory() as workspace:
            for way, listings in (("every header", ""), ("first, remembering", workspace),
                                  ("again, remembered", workspace)):
                result = load(manifest, listings)
                row = {"photos": size, "way": way, "seconds": round(result["seconds"], 2),
                       "peak_rss_mb": round(result["peak_rss_mb"])}
                print(json.dumps(row), flush=True)
                rows.append(row)
    lines = [
        "# Listing a manifest of photos, with and without remembered headers (`benchmarks/listing_speed.py`)",
        "",
        f"Written by `python benchmarks/listing_speed.py --sizes {' '.join(map(str, args.sizes))}` on "
        f"{time.strftime('%Y-%m-%d')} at commit {_commit()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end. `load_dataset(manifest, lazy=True)` in a fresh process "
        "per row, over the 224-px JPEGs of `benchmarks/scale.py`; the files' pages were in the OS cache.",
        "",
        "| photos | listing | seconds | µs per photo | peak RSS MB |",
        "|---:|---|---:|---:|---:|",
    ]
    lines += [f"| {r['photos']:,} | {r['way']} | {r['seconds']} | {1e6 * r['seconds'] / r['photos']:.0f} | "
              f"{r['peak_rss_mb']:,} |" for r in rows]
    RESULTS.write_text("\n".join(lines) + "\n")
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
