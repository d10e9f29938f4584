"""Latency of one review decision on the real dashboard server, at 1,000 and 50,000 rows.

    python benchmarks/click_latency.py                      # 1k and 50k rows, 10 decisions each
    python benchmarks/click_latency.py --sizes 50000 --decisions 20

Each size gets its own folder: an ``.npz`` of random 28×28 images in 10 classes, and a workspace run on
it whose scores and model outputs are random too (how long a click takes does not depend on what the
numbers are, and training a model on 50k rows would take this benchmark an hour on a CPU). Then
``influence-lens dashboard --data that.npz`` starts, and headless Chromium (playwright, Debian's
``chromium``) opens the gallery and presses K (keep) on successive cards. Per decision:

* ``written ms``: key press → the decision's row is in the SQLite file (the callback ran: the browser
  sent the key, the server started the rerun);
* ``shown ms``: key press → the card shows its "kept" badge (the gallery fragment reran, its delta
  reached the browser and was drawn): the number a reviewer feels, and an upper bound of server time;
* ``server ms``: the server's own time for the decision, from its debug log (``dashboard/timing.py``; the
  server runs with ``STREAMLIT_LOGGER_LEVEL=debug``): the ``decide`` callback plus the gallery fragment's
  rerun that follows it (table, filters, 24 cards and their images), the figure of the < 300 ms target
  (the JSON line also gives the median of each part);
* ``full rerun ms``: the status bar's Undo, which reruns the whole page (overview charts included), to
  the badge gone: what every click cost before the gallery became a fragment.

Medians and 90th percentiles, one JSON line per size, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.reports import add_results_arguments, results_file  # noqa: E402
from engine.runs import RunSettings, config_hash, load_run_data  # noqa: E402
from engine.scorers import ScoreResult  # noqa: E402
from engine.workspace import Workspace  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CLASSES = 10
TIMING = re.compile(r"\b(decide|gallery fragment) took ([0-9.]+) ms")  # dashboard/timing.py's lines


def make_run(folder: Path, rows: int, seed: int = 0) -> Workspace:
    """Random images and a stored run with random scores, logits and features."""
    rng = np.random.default_rng(seed)
    data_path = folder / f"random-{rows}.npz"
    np.savez(data_path, images=rng.integers(0, 256, (rows, 28, 28), dtype=np.uint8),
             labels=rng.integers(0, CLASSES, rows))
    settings = RunSettings(data=str(data_path), epochs=1)
    data = load_run_data(settings)
    key = config_hash(settings, data)
    workspace = Workspace.for_data(settings.data_key(), folder / "workspaces")
    workspace.save_run(key, settings.to_dict())
    logits = rng.normal(size=(rows, CLASSES)).astype(np.float32)
    workspace.save_arrays(key, {"logits": logits, "features": rng.normal(size=(rows, 32)).astype(np.float32)})
    workspace.save_result(key, ScoreResult("loss", rng.gamma(2.0, size=rows), logits.argmax(1), {}, {}))
    return workspace


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, data: Path, port: int) -> subprocess.Popen:
    log = open(folder / "server.log", "w")  # noqa: SIM115 (kept open for the server's life)
    process = subprocess.Popen([sys.executable, "-m", "engine.cli", "dashboard", "--data", str(data), "--port",
                                str(port), "--server.headless", "true"], cwd=folder, stdout=log,
                               stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "STREAMLIT_LOGGER_LEVEL": "debug"})
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as answer:
                if answer.read() == b"ok":
                    return process
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("the dashboard did not start")


def stop_server(process: subprocess.Popen) -> None:
    """The CLI and the Streamlit server it started, by their ids."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(process.pid)], capture_output=True,
                              text=True).stdout.split()
    for pid in [int(c) for c in children] + [process.pid]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    process.wait(timeout=60)


def wait_for(condition, timeout: float = 120.0, step: float = 0.002) -> float:
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError("no answer")
        time.sleep(step)
    return time.perf_counter()


def server_ms(log: Path, offset: int) -> tuple[float, float] | None:
    """The first ``decide`` after ``offset`` in the server's log and the gallery fragment run after it, in ms."""
    steps = TIMING.findall(log.read_text(errors="replace")[offset:])
    first = next((i for i, (step, _) in enumerate(steps) if step == "decide"), None)
    rerun = next((float(ms) for step, ms in steps[first + 1:] if step == "gallery fragment"), None) \
        if first is not None else None
    return None if rerun is None else (float(steps[first][1]), rerun)


def measure(rows: int, decisions: int) -> dict:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        workspace = make_run(folder, rows)
        process = start_server(folder, folder / f"random-{rows}.npz", port := free_port())
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                     args=["--no-sandbox", "--disable-gpu"])
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.set_default_timeout(600_000)
                started = time.perf_counter()
                page.goto(f"http://127.0.0.1:{port}/review")
                page.wait_for_function("window.__ilKeysInstalled && window.__ilKeys && "
                                       "!document.querySelector('.stSkeleton')", timeout=600_000)
                first_load = time.perf_counter() - started
                cards = page.evaluate("window.__ilKeys.data.cards")
                written, shown, decide, fragment, full = [], [], [], [], []
                log = folder / "server.log"
                for card in cards[:decisions]:
                    before = len(workspace.decision_log())
                    offset = len(log.read_text(errors="replace"))
                    pressed = time.perf_counter()
                    page.keyboard.press("k")
                    # polled every 10 ms: faster polling of the SQLite file takes the server's CPU on a small box
                    written.append(wait_for(lambda b=before: len(workspace.decision_log()) > b, step=0.01) - pressed)
                    page.locator(f".st-key-card_{card}").filter(has_text="kept").first.wait_for()
                    shown.append(time.perf_counter() - pressed)
                    wait_for(lambda o=offset: server_ms(log, o) is not None, step=0.05)
                    callback, rerun = server_ms(log, offset)
                    decide.append(callback / 1000)
                    fragment.append(rerun / 1000)
                for card in list(reversed(cards[:decisions]))[:5]:  # full-page reruns: the status bar's Undo
                    pressed = time.perf_counter()
                    page.locator(".st-key-undo button").first.dispatch_event("click")  # under the sticky header
                    page.locator(f".st-key-card_{card}").filter(has_text="kept").first.wait_for(state="detached")
                    full.append(time.perf_counter() - pressed)
                browser.close()
        finally:
            stop_server(process)

    def ms(values: list[float], q: float) -> float:
        return round(1000 * float(np.quantile(values, q)), 1)

    server = np.add(decide, fragment).tolist()

    return {"rows": rows, "first_load_s": round(first_load, 1), "decisions": len(written),
            "written_ms_median": ms(written, 0.5), "written_ms_p90": ms(written, 0.9),
            "shown_ms_median": ms(shown, 0.5), "shown_ms_p90": ms(shown, 0.9),
            "server_ms_median": ms(server, 0.5), "server_ms_p90": ms(server, 0.9),
            "decide_ms_median": ms(decide, 0.5), "fragment_ms_median": ms(fragment, 0.5),
            "full_rerun_ms_median": ms(full, 0.5), "full_rerun_ms_p90": ms(full, 0.9)}


TITLE = "Click latency of one review decision on the real server"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 50000])
    parser.add_argument("--decisions", type=int, default=10)
    add_results_arguments(parser)
    args = parser.parse_args()
    with results_file(args, TITLE):
        results = []
        for rows in args.sizes:
            results.append(measure(rows, args.decisions))
            print(json.dumps(results[-1]), flush=True)
        print("| rows | first load s | written ms (median / p90) | shown ms (median / p90) "
              "| server ms (median / p90) | full rerun ms (median / p90) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['rows']:,} | {r['first_load_s']} | {r['written_ms_median']} / {r['written_ms_p90']} | "
                  f"{r['shown_ms_median']} / {r['shown_ms_p90']} | {r['server_ms_median']} / {r['server_ms_p90']} | "
                  f"{r['full_rerun_ms_median']} / {r['full_rerun_ms_p90']} |")


if __name__ == "__main__":
    main()
