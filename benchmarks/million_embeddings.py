"""A million rows from ``--embeddings``: the whole CLI run's time and peak memory.

    python benchmarks/million_embeddings.py                 # 1,000,000 × 256 float32, vm-loss
    python benchmarks/million_embeddings.py --rows 200000

The data are made here (``benchmarks/out/million``, not committed): 10 classes of 256-d Gaussian
embeddings (class means 1.5 apart per dimension on 8 dimensions, unit noise), an ``.npz`` with the
labels and 4×4 random images (the rows the embeddings stand for), then ``influence-lens score
data.npz --embeddings emb.npy --method vm-loss --val-from-train 0.02 --noise-rate 0.2 --workspace W``
in a fresh process, its peak PSS (with its workers) and its main process's peak RSS sampled every
50 ms. Then the dashboard on that workspace (``influence-lens dashboard --data data.npz``, the real
server, headless Chromium at 1280×800, as ``click_latency.py`` drives it): seconds from opening the
gallery to its first cards painted, the server's peak RSS (VmHWM) once they are, and per decision
(K on successive cards) the seconds from the key to its row in the SQLite file ("server time") and to
the card's "saved". Writes ``benchmarks/results/million_embeddings_cpu.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from click_latency import free_port, open_gallery, press_keep, start_server, stop_server  # noqa: E402
from scale import measure  # noqa: E402

from benchmarks.reports import add_results_arguments, results_file  # noqa: E402

DIM, CLASSES = 256, 10


def make_data(folder: Path, rows: int) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    data, embeddings = folder / f"data_{rows}.npz", folder / f"emb_{rows}.npy"
    if data.exists() and embeddings.exists():
        return data, embeddings
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, rows)
    means = np.zeros((CLASSES, DIM), dtype=np.float32)
    means[:, :8] = rng.normal(0, 1.5, (CLASSES, 8))
    table = np.lib.format.open_memmap(embeddings, mode="w+", dtype=np.float32, shape=(rows, DIM))
    for lo in range(0, rows, 100_000):  # written in slices: never the whole array in memory
        hi = min(lo + 100_000, rows)
        table[lo:hi] = means[labels[lo:hi]] + rng.normal(0, 1, (hi - lo, DIM)).astype(np.float32)
    table.flush()
    np.savez(data, images=rng.integers(0, 256, (rows, 4, 4), dtype=np.uint8), labels=labels)
    return data, embeddings


def server_peak_rss_mb(process) -> float:
    """VmHWM of the Streamlit server the dashboard command started (its child)."""
    import subprocess

    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(process.pid)], capture_output=True,
                              text=True).stdout.split() or [str(process.pid)]
    status = Path(f"/proc/{children[0]}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024


def open_dashboard(folder: Path, data: Path, workspace_file: Path, decisions: int) -> dict:
    """The dashboard on the scored workspace: first load, server peak RSS, per-decision times."""
    import time

    from playwright.sync_api import sync_playwright

    from engine.workspace import Workspace

    workspace = Workspace(workspace_file)
    process = start_server(folder, data, port := free_port())
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                                 args=["--no-sandbox", "--disable-gpu"])
            started = time.perf_counter()
            page = open_gallery(browser, f"http://127.0.0.1:{port}")
            first_load = time.perf_counter() - started
            peak = server_peak_rss_mb(process)
            written, saved = [], []
            for card in page.evaluate("window.__ilGallery.data.cards.map(c => c.i)")[:decisions]:
                to_sqlite, to_saved = press_keep(page, workspace, card)
                written.append(to_sqlite)
                saved.append(to_saved)
                time.sleep(0.6)
            browser.close()
    finally:
        stop_server(process)
    return {"first_load_s": round(first_load, 1), "server_peak_rss_mb": round(peak),
            "decision_written_s_median": round(float(np.median(written)), 3),
            "decision_saved_s_median": round(float(np.median(saved)), 3), "decisions": len(written)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--method", default="vm-loss")
    parser.add_argument("--decisions", type=int, default=5, help="decisions timed in the dashboard (0: no dashboard)")
    add_results_arguments(parser)
    args = parser.parse_args()
    folder = ROOT / "benchmarks" / "out" / "million"
    data, embeddings = make_data(folder, args.rows)
    run_folder = folder / f"run_{args.rows}"  # the dashboard starts here: its workspaces/ is the CLI's
    shutil.rmtree(run_folder, ignore_errors=True)
    workspace = run_folder / "workspaces"
    workspace.mkdir(parents=True)
    with results_file(args, f"{args.rows:,} rows from --embeddings ({DIM}-d float32), {args.method}"):
        summary, seconds, pss, hwm = measure(
            [sys.executable, "-m", "engine.cli", "score", str(data), "--embeddings", str(embeddings), "--method",
             args.method, "--val-from-train", "0.02", "--noise-rate", "0.2", "--workspace", str(workspace),
             "--out", str(run_folder / "scores.csv")], {**os.environ, "PYTHONPATH": str(ROOT)})
        row = {"rows": args.rows, "method": args.method, "seconds": round(seconds, 1), "peak_pss_mb": round(pss),
               "main_peak_rss_mb": round(hwm), "auroc": summary.get("auroc"),
               "embeddings_mb": round(embeddings.stat().st_size / 2**20)}
        print(json.dumps(row))
        if args.decisions:
            row.update(open_dashboard(run_folder, data, Path(summary["workspace"]["file"]), args.decisions))
            print(json.dumps(row))
        print("\n| rows | method | whole run s | peak PSS MB | main peak RSS MB | embeddings file MB | AUROC |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        print(f"| {row['rows']:,} | {row['method']} | {row['seconds']} | {row['peak_pss_mb']:,} | "
              f"{row['main_peak_rss_mb']:,} | {row['embeddings_mb']:,} | {row['auroc']} |")
        if args.decisions:
            print("\n| dashboard first load s | server peak RSS MB | decision → SQLite s (median) | "
                  "decision → card saved s (median) |")
            print("|---:|---:|---:|---:|")
            print(f"| {row['first_load_s']} | {row['server_peak_rss_mb']:,} | {row['decision_written_s_median']} | "
                  f"{row['decision_saved_s_median']} |")


if __name__ == "__main__":
    main()
