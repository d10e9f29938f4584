"""Scoring a folder of real-sized photos through a frozen backbone as N grows: memory and throughput.

    python benchmarks/scale.py                                   # 5k, 25k, 100k photos of 224 px
    python benchmarks/scale.py --sizes 5000 25000 --pool /tmp/photos

The photos are CIFAR-10's training images (``../shared/data``, 50,000) upscaled to 224×224 JPEGs
(quality 90) in one folder per class; the 100k set uses each image twice, the second copy mirrored.
They are written once to ``--pool`` (default ``benchmarks/out/scale``, not committed), with one
``path,label`` manifest of the first N files per size. The backbone is a stand-in for the user's
network: a TorchScript conv net (4×4 patches, then two strided 3×3 convs, 128-d pooled features),
randomly initialised with a fixed seed; what is measured is the data path, not its accuracy.

Each size runs ``influence-lens score MANIFEST --method vm-loss --backbone backbone.pt
--val-from-train 0.02 --noise-rate 0.2 --workspace W`` in a fresh process (the CLI as a user runs
it), and the "bare" loop, a DataLoader (the same worker count and decoding) and the backbone's
forward pass over the same files and nothing else: the physical limit of this path. Memory: peak
PSS of the run's process tree (main + DataLoader workers, shared pages counted once), sampled every
50 ms, and the main process's peak RSS (VmHWM). Writes ``benchmarks/results/scale_cpu.md``.

``--torchrun-size N`` then runs size N again as ``torchrun --standalone --nproc-per-node 2 -m
engine.cli score ... --distributed``, kills every process of it with SIGKILL once a third of its feature
chunks are saved, runs it again to the end (it resumes at the missing chunks), and compares its scores
with the single-process run's: the Spearman correlation over the rows, and how many of the top 5%
agree. Written to ``benchmarks/results/scale_torchrun_cpu.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from streaming_memory import _children, _pss_mb  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SIDE = 224
RESULTS = ROOT / "benchmarks" / "results" / "scale_cpu.md"
TORCHRUN_RESULTS = ROOT / "benchmarks" / "results" / "scale_torchrun_cpu.md"


def _relative(i: int, label: int) -> str:
    return f"class_{label}/{i:07d}.jpg"


def _write_photos(job: tuple[int, int, list[bytes], list[int], str]) -> None:
    start, copies, blobs, labels, pool = job
    for k, (blob, label) in enumerate(zip(blobs, labels, strict=True)):
        image = Image.open(io.BytesIO(blob)).convert("RGB").resize((SIDE, SIDE), Image.BICUBIC)
        for copy in range(copies):
            i = start + k + copy * 50_000
            path = Path(pool) / _relative(i, label)
            if not path.exists():
                (ImageOps.mirror(image) if copy else image).save(path, quality=90)


def make_photos(pool: Path, n: int, sizes: list[int]) -> list[int]:
    """Photos 0..n-1 (kept between runs) and a manifest of the first N per size; their labels."""
    index = np.load(SHARED / "cifar10_train_jpegq75_index.npz")
    offsets, clean = index["offsets"], index["labels"]
    blob = (SHARED / "cifar10_train_jpegq75.bin").read_bytes()
    for c in range(10):
        (pool / f"class_{c}").mkdir(parents=True, exist_ok=True)
    copies = -(-n // 50_000)
    step = 1000
    jobs = [(lo, copies, [blob[offsets[i]:offsets[i + 1]] for i in range(lo, min(lo + step, 50_000))],
             clean[lo:lo + step].tolist(), str(pool)) for lo in range(0, min(n, 50_000), step)]
    with ProcessPoolExecutor(os.cpu_count()) as workers:
        list(workers.map(_write_photos, jobs))
    labels = [int(clean[i % 50_000]) for i in range(n)]
    for size in sizes:
        manifest = pool / f"manifest_{size}.csv"
        manifest.write_text("path,label\n" + "".join(f"{_relative(i, labels[i])},{labels[i]}\n" for i in range(size)))
    return labels


class StandIn(torch.nn.Module):
    """The stand-in backbone: 4×4 patches to 32 channels, two strided 3×3 convs, average pooling."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 4, stride=4), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make_backbone(path: Path) -> Path:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(StandIn().eval()), str(path))
    return path


BARE = """
import sys, time, json
import numpy as np, torch
sys.path.insert(0, sys.argv[3])
from engine.data import load_dataset
from engine.sources import batches, inference_batch
from engine.frozen import IMAGENET_MEAN, IMAGENET_STD
from engine.task import ImageTask
dataset = load_dataset(sys.argv[1], lazy=True)
module = torch.jit.load(sys.argv[2]).eval()
task = ImageTask(IMAGENET_MEAN, IMAGENET_STD)
start = time.perf_counter()
with torch.no_grad():
    for _, images in batches(dataset.images, batch_size=inference_batch(dataset.image_shape, cap=256)):
        module(task.inputs(images))
print(json.dumps({"seconds": time.perf_counter() - start, "rows": len(dataset)}))
"""


class TreeSampler(threading.Thread):
    """The peak PSS of a process and its children, and the process's own peak RSS, every 50 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.pss, self.hwm, self.done = pid, 0.0, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.pss = max(self.pss, _pss_mb(self.pid) + sum(_pss_mb(c) for c in _children(self.pid)))
            try:
                with open(f"/proc/{self.pid}/status") as status:
                    self.hwm = max(self.hwm, next(int(line.split()[1]) for line in status
                                                  if line.startswith("VmHWM")) / 1024)
            except (FileNotFoundError, ProcessLookupError, StopIteration):
                pass

    def stop(self) -> tuple[float, float]:
        self.done.set()
        self.join()
        return self.pss, self.hwm


def measure(command: list[str], env: dict) -> tuple[dict, float, float, float]:
    """Run ``command``; its last stdout line (JSON), wall seconds, peak tree PSS MB and main peak RSS MB."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(process.pid)
    sampler.start()
    out, err = process.communicate()
    seconds = time.perf_counter() - start
    pss, hwm = sampler.stop()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), seconds, pss, hwm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 25_000, 100_000])
    parser.add_argument("--pool", default=str(ROOT / "benchmarks" / "out" / "scale"))
    parser.add_argument("--bare-sizes", type=int, nargs="*", default=None,
                        help="sizes to run the bare DataLoader + forward loop on (default: all)")
    parser.add_argument("--torchrun-size", type=int, default=None,
                        help="then this size under torchrun with 2 ranks, killed and resumed (one of --sizes)")
    args = parser.parse_args()
    pool = Path(args.pool)
    pool.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    make_photos(pool, max(args.sizes), sorted(args.sizes))
    print(json.dumps({"photos": max(args.sizes), "generate_seconds": round(time.perf_counter() - start, 1)}),
          flush=True)
    backbone = make_backbone(pool / "backbone.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = []
    for size in sorted(args.sizes):
        manifest = pool / f"manifest_{size}.csv"
        workspace = pool / f"workspace_{size}"
        subprocess.run(["rm", "-rf", str(workspace)], check=True)
        workspace.mkdir()
        summary, seconds, pss, hwm = measure(
            [sys.executable, "-m", "engine.cli", "score", str(manifest), "--method", "vm-loss", "--backbone",
             str(backbone), "--val-from-train", "0.02", "--noise-rate", "0.2", "--workspace", str(workspace),
             "--out", str(workspace / "scores.csv"), "--force"], env)
        row = {"photos": size, "seconds": round(seconds, 1), "images_per_s": round(size / seconds, 1),
               "peak_pss_mb": round(pss), "main_peak_rss_mb": round(hwm), "auroc": summary.get("auroc")}
        if args.bare_sizes is None or size in args.bare_sizes:
            bare, bare_seconds, bare_pss, _ = measure([sys.executable, "-c", BARE, str(manifest), str(backbone),
                                                       str(ROOT)], env)
            row.update(bare_images_per_s=round(size / bare_seconds, 1), bare_peak_pss_mb=round(bare_pss),
                       ratio=round(bare_seconds / seconds, 3))
        print(json.dumps(row), flush=True)
        rows.append(row)
    write_table(rows)
    if args.torchrun_size:
        write_torchrun(torchrun_resumed(pool, args.torchrun_size, backbone, env))


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its ranks in sessions of their own)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def torchrun_resumed(pool: Path, size: int, backbone: Path, env: dict) -> dict:
    """Size ``size`` under torchrun with 2 ranks, killed (SIGKILL, every process) once a third of the
    feature chunks are saved, then run again to the end; its scores against the single-process run's."""
    import pandas as pd
    from scipy.stats import spearmanr

    workspace = pool / f"workspace_{size}_torchrun"
    subprocess.run(["rm", "-rf", str(workspace)], check=True)
    workspace.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "engine.cli", "score", str(pool / f"manifest_{size}.csv"), "--method", "vm-loss", "--backbone",
               str(backbone), "--val-from-train", "0.02", "--noise-rate", "0.2", "--workspace", str(workspace),
               "--out", str(workspace / "scores.csv"), "--distributed", "--force"]
    start = time.perf_counter()
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chunks = -(-size // 4096)
    while victim.poll() is None and len(list((workspace / "stages").glob("features-*.chunk-*"))) < chunks // 3:
        time.sleep(0.2)
    saved = len(list((workspace / "stages").glob("features-*.chunk-*")))
    for pid in [victim.pid, *_descendants(victim.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    victim.wait()
    killed_after = time.perf_counter() - start
    summary, seconds, pss, _ = measure(command, env)
    both = pd.read_csv(workspace / "scores.csv").set_index("index")["score"].to_frame("torchrun").join(
        pd.read_csv(pool / f"workspace_{size}" / "scores.csv").set_index("index")["score"].to_frame("one"))
    top = max(1, len(both) // 20)
    agree = len(set(both["torchrun"].nlargest(top).index) & set(both["one"].nlargest(top).index)) / top
    row = {"photos": size, "ranks": 2, "killed_after_s": round(killed_after, 1), "chunks_saved_when_killed": saved,
           "chunks": chunks, "resumed_run_s": round(seconds, 1), "resumed_peak_pss_mb": round(pss),
           "resumed": summary["workspace"]["stages"]["computed"],
           "spearman_vs_one_process": round(float(spearmanr(both["torchrun"], both["one"]).statistic), 4),
           "top_5pct_agreement": round(agree, 4), "auroc": summary.get("auroc")}
    print(json.dumps(row), flush=True)
    return row


def write_torchrun(row: dict) -> None:
    TORCHRUN_RESULTS.write_text("\n".join([
        "# Scale under torchrun: 2 ranks, killed and resumed, against one process (`benchmarks/scale.py`)",
        "",
        f"Written by `python benchmarks/scale.py --sizes {row['photos']} --torchrun-size {row['photos']}` on "
        f"{time.strftime('%Y-%m-%d')} at commit {_commit()}, {platform.machine()}, {os.cpu_count()} cores, CPU only "
        "(a shared machine). `torchrun --standalone --nproc-per-node 2 -m engine.cli score MANIFEST --method vm-loss "
        "--backbone backbone.pt --val-from-train 0.02 --noise-rate 0.2 --workspace W --distributed`, every process "
        "killed with SIGKILL once a third of the feature chunks were saved, then the same command again to the end.",
        "",
        "| photos | ranks | killed after s | feature chunks saved / all | resumed run s | resumed peak PSS MB | "
        "Spearman vs one process | top-5% agreement | AUROC |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {row['photos']:,} | {row['ranks']} | {row['killed_after_s']} | {row['chunks_saved_when_killed']} / "
        f"{row['chunks']} | {row['resumed_run_s']} | {row['resumed_peak_pss_mb']:,} | "
        f"{row['spearman_vs_one_process']} | {row['top_5pct_agreement']} | {row['auroc']} |",
        "",
        f"Stages the resumed run computed: {', '.join(row['resumed'])}.",
        ""]))
    print(TORCHRUN_RESULTS.read_text())


def _commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def write_table(rows: list[dict]) -> None:
    lines = [
        "# Scale: a folder of 224-px photos through a frozen backbone, vm-loss (`benchmarks/scale.py`)",
        "",
        f"Written by `python benchmarks/scale.py --sizes {' '.join(str(r['photos']) for r in rows)}` on "
        f"{time.strftime('%Y-%m-%d')} at commit {_commit()}, {platform.machine()}, {os.cpu_count()} cores, CPU "
        "only (a shared "
        "machine: other jobs ran beside it). The photos are CIFAR-10 training images upscaled to 224×224 JPEG; "
        "the backbone is a stand-in TorchScript conv net (random weights, 128-d features). Whole run = "
        "`influence-lens score MANIFEST --method vm-loss --backbone backbone.pt --val-from-train 0.02 "
        "--noise-rate 0.2 --workspace W` in a fresh process: listing, feature extraction (memory-mapped float16 "
        "stage), head training, fine-tune, scoring, writing the CSV. Bare = the same DataLoader decoding and the "
        "backbone's forward pass over the same files, nothing else. Peak PSS: main process + DataLoader workers "
        "(shared pages counted once), sampled every 50 ms.",
        "",
        "| photos | whole run s | images/s | bare images/s | whole / bare | peak PSS MB | main peak RSS MB | "
        "bare peak PSS MB | AUROC (20% noise) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['photos']:,} | {r['seconds']} | {r['images_per_s']} | {r.get('bare_images_per_s', '')} | "
                     f"{r.get('ratio', '')} | {r['peak_pss_mb']:,} | {r['main_peak_rss_mb']:,} | "
                     f"{r.get('bare_peak_pss_mb', '')} | {r['auroc']} |")
    RESULTS.write_text("\n".join(lines) + "\n")
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
