"""The real dashboard in headless Chromium: start `influence-lens dashboard`, run a fast scoring,
accept three suggestions from the gallery with the keyboard, find them in the SQLite file, reload and
restart and see them still there, then retrain and see the accuracy after; and the reviewer's
keyboard workbench (the gallery is one client-side component, ``dashboard/gallery.py``).

Playwright (``pip install -e '.[dev]'``) drives Debian's ``chromium`` (``apt-get install -y chromium``;
no browser download); skipped with the reason when either is absent. Screenshots of each step go to
``$E2E_SCREENSHOTS`` (default: the test's temporary folder).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from engine.measured import recommended_methods
from engine.scorers import available_methods, scorer_class
from engine.workspace import Workspace

pytestmark = pytest.mark.e2e
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 180_000  # the machine is shared and slow: generous waits, never sleeps

if not Path(CHROMIUM).exists():
    pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install -y chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
expect = sync_api.expect


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the dashboard exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/_stcore/health did not answer ok in {timeout} s")


class Dashboard:
    """`influence-lens dashboard` as a user starts it, in a folder of its own (its workspaces/ land there)."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with open(self.folder / "server.log", "a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "engine.cli", "dashboard", "--port", str(self.port),
                                             "--server.headless", "true"], cwd=self.folder, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)
        wait_healthy(self.url, self.process)

    def stop(self) -> None:
        """Terminate the CLI and the streamlit server it started (its child), by their ids."""
        if self.process is None:
            return
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True,
                                  text=True).stdout.split()
        pids = [int(c) for c in children] + [self.process.pid]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 30  # streamlit shuts down gracefully, which can take a while
        while time.time() < deadline and any(Path(f"/proc/{pid}").exists() and self._alive(pid) for pid in pids):
            self.process.poll()
            time.sleep(0.2)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=10)
        self.process = None

    @staticmethod
    def _alive(pid: int) -> bool:
        """Running (a zombie waiting to be reaped counts as gone)."""
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False


@pytest.fixture
def server(tmp_path):
    dashboard = Dashboard(tmp_path)
    dashboard.start()
    yield dashboard
    dashboard.stop()


@pytest.fixture
def page(tmp_path):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1600, "height": 1300})
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        yield page
        browser.close()


def shots_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("E2E_SCREENSHOTS", tmp_path / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def expect_accepted(page, accepted: dict[int, str]) -> None:
    """Each card shows its relabel."""
    for index, label in accepted.items():
        card = page.locator(f".il-card[data-i='{index}']")
        expect(card).to_contain_text(f"relabeled → {label}")
        expect(card.locator("img")).to_be_visible()


def test_three_accepted_suggestions_persist_and_retrain(server, page, tmp_path):
    shots = shots_dir(tmp_path)
    started = time.time()
    page.goto(server.url)
    expect(page.locator(".st-key-run button")).to_be_enabled()
    # one method, the best measured (drop the other defaults), 2 epochs; the demo noise is on for the sample data
    best = recommended_methods(available_methods(), 1)[0]
    best = f"{best} ✱" if scorer_class(best).requires_validation else best  # as the multiselect shows it
    others = page.locator(f".st-key-setup_methods button[aria-label^='Remove']:not([aria-label='Remove {best}'])")
    while (count := others.count()) > 0:
        others.first.click()
        expect(others).to_have_count(count - 1)
    expect(page.locator(".st-key-setup_methods [data-tag] span[title]")).to_have_text([best])
    epochs = page.locator(".st-key-setup_epochs_fast-cpu input")
    epochs.fill("2")
    epochs.press("Tab")
    expect(epochs).to_have_value("2")
    page.screenshot(path=shots / "1-setup.png")
    page.locator(".st-key-run button").click()

    cards = page.locator(".il-card")
    expect(cards).to_have_count(24, timeout=2 * TIMEOUT_MS)  # one page
    first_gallery_seconds = time.time() - started
    expect(cards.locator("img").first).to_be_visible()
    page.screenshot(path=shots / "2-gallery.png")

    # finding 2: the keyboard works at once on the gallery the run opened by itself (no reload)
    data = page.evaluate("window.__ilGallery.data")
    names = data["classes"]
    accepted = {}
    for card in data["cards"]:  # the cursor starts on the first card; A accepts and moves on
        if len(accepted) == 3:
            break
        if card["s"] != card["g"]:
            page.keyboard.press("a")
            accepted[card["i"]] = names[card["s"]]
        else:
            page.keyboard.press("ArrowRight")
    assert len(accepted) == 3
    expect_accepted(page, accepted)
    for index in accepted:  # the server acknowledged each write
        expect(page.locator(f".il-card[data-i='{index}'] .il-saved")).to_be_attached()
    page.screenshot(path=shots / "3-accepted.png")

    (workspace_path,) = (server.folder / "workspaces").glob("*.sqlite")
    decisions = Workspace(workspace_path).decisions()
    assert sorted(decisions[["index", "action"]].values.tolist()) == [[i, "relabel"] for i in sorted(accepted)]
    # the sample data's class names are the digits
    assert {int(i): str(n) for i, n in zip(decisions["index"], decisions["new_label"], strict=True)} == accepted

    page.reload()
    expect_accepted(page, accepted)
    # the review-depth summary (drawn outside the gallery's fragment) counts the three relabels as errors
    expect(page.locator("[data-testid='stExpander'] summary", has_text="How deep to review")).to_contain_text(
        "found 3 of about")
    page.screenshot(path=shots / "4-after-reload.png")

    server.stop()  # a server restart loses nothing either
    server.start()
    page.reload()
    expect_accepted(page, accepted)
    page.screenshot(path=shots / "5-after-restart.png")

    page.goto(f"{server.url}/recovery")  # journey 4: retrain with the decisions applied
    page.locator(".st-key-retrain button").click()
    after = page.locator("[data-testid='stMetric']", has_text="Test accuracy after")
    expect(after).to_be_visible(timeout=2 * TIMEOUT_MS)
    page.screenshot(path=shots / "6-recovery.png")
    report = Workspace(workspace_path).report(Workspace(workspace_path).runs()["config_hash"][0], "retrain")
    assert report["n_relabeled"] == 3
    print(f"launch to first gallery: {first_gallery_seconds:.1f} s; screenshots in {shots}")


def wait_until(condition, timeout: float = TIMEOUT_MS / 1000) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError("the workspace never reached the expected state")
        time.sleep(0.2)


def visible_thumbnails(page) -> int:
    """Card images wholly inside the window, drawn."""
    return page.evaluate("""Array.from(document.querySelectorAll(".il-card img")).filter(img => {
        const box = img.getBoundingClientRect();
        return box.width > 0 && box.top >= 0 && box.bottom <= innerHeight && img.complete && img.naturalWidth > 0;
    }).length""")


def wait_for_card_images(page, count: int = 24) -> None:
    """Every card shows its thumbnail (decoded), so a screenshot is not of empty frames."""
    page.wait_for_function("""n => { const images = [...document.querySelectorAll(".il-card img")];
        return images.length >= n && images.every(i => i.complete && i.naturalWidth > 0); }""", arg=count)
    expect(page.get_by_text("lists every key")).to_be_visible()  # the gallery's last line: drawn to the end
    page.wait_for_timeout(300)  # one more paint


def log_rows(workspace: Workspace) -> list[tuple[int, str]]:
    log = workspace.decision_log()
    return list(zip(log["index"].tolist(), log["action"].tolist(), strict=True))


def test_keyboard_review_flow(tmp_path):
    """The reviewer's workbench at 1280×800, by keyboard only: the grid first, the cursor, accept while a
    switch has focus, relabel with a digit, undo, keys after a dropdown choice, N / P and the page box,
    select with Space and bulk accept with Shift+A (skipping a decided card), one undo, and eight keys
    typed one per 150 ms all stored, in order."""
    shots = shots_dir(tmp_path)
    subprocess.run([sys.executable, "-m", "engine.cli", "score", "sample", "--method", "loss", "--epochs", "2",
                    "--noise-rate", "0.1", "--workspace", "workspaces", "--out", "loss.csv"], cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, check=True, capture_output=True)
    (workspace_path,) = (tmp_path / "workspaces").glob("*.sqlite")
    workspace = Workspace(workspace_path)
    server = Dashboard(tmp_path)
    server.start()
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            page.goto(f"{server.url}/review")
            page.wait_for_function("window.__ilGallery && window.__ilGallery.data && "
                                   "!document.querySelector('.stSkeleton')")
            cards = page.evaluate("window.__ilGallery.data.cards.map(c => c.i)")
            assert len(cards) == 24
            wait_for_card_images(page)
            # finding 9: the grid first: at least 16 thumbnails on arrival, without scrolling
            page.screenshot(path=shots / "gallery.png")
            assert page.evaluate("scrollY") == 0
            assert visible_thumbnails(page) >= 16, visible_thumbnails(page)

            page.keyboard.press("ArrowRight")  # the cursor: first card → second, outlined
            second = page.locator(f".il-card[data-i='{cards[1]}']")
            expect(second).to_have_css("outline-style", "solid")
            # flip the "overwrite decisions" switch on and off (a checkbox input: it keeps the focus), then
            # accept the cursor's suggestion with a key
            switch = page.locator(".st-key-bulk_overwrite input")
            switch.check(force=True)
            expect(switch).to_be_checked()
            switch.uncheck(force=True)
            expect(switch).not_to_be_checked()
            assert page.evaluate("document.activeElement.type") == "checkbox"
            page.keyboard.press("a")
            expect(second).to_contain_text("relabeled →")  # at once, in the browser
            wait_until(lambda: cards[1] in workspace.decisions()["index"].tolist())
            assert workspace.decisions().set_index("index").loc[cards[1], "action"] == "relabel"
            expect(second.locator(".il-saved")).to_be_attached()  # acknowledged
            # the cursor moved on: a digit relabels the third card to that class
            expect(page.locator(f".il-card[data-i='{cards[2]}']")).to_have_css("outline-style", "solid")
            page.keyboard.press("7")
            wait_until(lambda: cards[2] in workspace.decisions()["index"].tolist())
            assert workspace.decisions().set_index("index").loc[cards[2], "new_label"] == 7
            page.keyboard.press("u")  # undo: the relabel to 7 goes
            wait_until(lambda: cards[2] not in workspace.decisions()["index"].tolist())
            page.keyboard.press("k")  # the cursor stayed on the fourth card: keep it
            wait_until(lambda: cards[3] in workspace.decisions()["index"].tolist())
            page.keyboard.press("?")
            expect(page.locator("#il-help")).to_contain_text("relabel to that class")
            page.screenshot(path=shots / "gallery-keys.png")
            page.keyboard.press("Escape")
            expect(page.locator("#il-help")).to_have_count(0)

            # finding 6: N / P turn pages, and the "Go to page" box follows
            page.keyboard.press("n")
            expect(page.locator(".st-key-gallery_goto input")).to_have_value("2")
            page.wait_for_function("c => window.__ilGallery.data.cards[0].i !== c", arg=cards[0])
            page.keyboard.press("p")
            expect(page.locator(".st-key-gallery_goto input")).to_have_value("1")
            page.wait_for_function("c => window.__ilGallery.data.cards[0].i === c", arg=cards[0])

            # finding 5: after a choice in a dropdown its search box keeps the focus; keys still go to the gallery
            page.locator(".st-key-review_per_page").click()
            page.get_by_role("option", name="48").click()
            page.wait_for_function("window.__ilGallery.data.cards.length === 48")
            assert page.evaluate("document.activeElement.getAttribute('role')") == "combobox"
            cursor = page.evaluate("Number(sessionStorage.getItem('il-cursor'))")
            page.keyboard.press("d")
            wait_until(lambda: cursor in workspace.decisions()["index"].tolist())
            assert workspace.decisions().set_index("index").loc[cursor, "action"] == "drop"
            expect(page.locator(".st-key-review_per_page input")).to_have_value("48")  # nothing typed into it
            page.keyboard.press("u")
            wait_until(lambda: cursor not in workspace.decisions()["index"].tolist())

            # settings belong to the run: typing in a number field is typing, and it survives a page switch
            cut = page.locator(".st-key-review_cut input")
            cut.fill("40")
            cut.press("Tab")
            expect(cut).to_have_value("40")
            run_key = workspace.runs()["config_hash"][0]
            wait_until(lambda: (workspace.report(run_key, "review_settings") or {}).get("cut") == 40)  # stored
            assert len(workspace.decisions()) == 2  # the digits typed did not relabel anything
            page.get_by_role("link", name="Sample detail").click()
            expect(page.get_by_role("heading", name="Sample detail")).to_be_visible()
            page.wait_for_function("""() => {
                const images = [...document.querySelectorAll("[data-testid='stImage'] img")];
                return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0); }""")
            expect(page.get_by_text("Suggested by")).to_be_visible()
            page.screenshot(path=shots / "detail.png")
            page.get_by_role("link", name="Review the suspects").click()
            expect(page.locator(".st-key-review_cut input")).to_have_value("40")
            page.wait_for_function("window.__ilGallery && window.__ilGallery.data && "
                                   "window.__ilGallery.data.cards.length === 40")

            # select three cards with Space (one of them kept already), accept them at once with Shift+A:
            # the kept card is skipped; one undo takes the batch back
            for _ in range(40):  # the cursor to the first card
                page.keyboard.press("ArrowLeft")
            chosen = cards[3:6]
            for _ in range(3):
                page.keyboard.press("ArrowRight")
            for index in chosen:
                page.keyboard.press(" ")
                expect(page.locator(f".il-card[data-i='{index}']")).to_have_class(re.compile("il-selected"))
                page.keyboard.press("ArrowRight")
            expect(page.locator(".st-key-gallery_bar")).to_contain_text("3 selected")
            page.keyboard.press("Shift+A")
            expect(page.locator(".st-key-gallery_bar")).to_contain_text("skipped 1 already decided")
            current = workspace.decisions().set_index("index")["action"]
            assert current[cards[3]] == "keep" and (current[chosen[1:]] == "relabel").all(), current
            wait_for_card_images(page, 40)
            page.screenshot(path=shots / "gallery-bulk.png")
            page.keyboard.press("u")
            wait_until(lambda: sorted(workspace.decisions()["index"]) == sorted(cards[1:4:2]))

            # issue 17: keys typed fast were lost (5 of 8 stored at one per 150 ms): all arrive, in order
            before = log_rows(workspace)
            typed = page.evaluate("window.__ilGallery.data.cards.map(c => c.i)")[8:16]
            for _ in range(40):
                page.keyboard.press("ArrowLeft")
            for _ in range(8):
                page.keyboard.press("ArrowRight")
            assert page.evaluate("Number(sessionStorage.getItem('il-cursor'))") == typed[0]
            for _ in typed:
                page.keyboard.press("k")
                page.wait_for_timeout(150)
            wait_until(lambda: len(log_rows(workspace)) >= len(before) + 8)
            assert log_rows(workspace)[len(before):] == [(i, "keep") for i in typed]
            # finding 10: badges no longer wrap, so every card of the page has the same height
            heights = page.evaluate("[...document.querySelectorAll('.il-card')].map(c => c.offsetHeight)")
            assert len(set(heights)) == 1, heights

            # a write that fails (another process holds the workspace's write lock for longer than the server
            # waits) is shown on its card, and retried until it is stored
            target = page.evaluate("Number(sessionStorage.getItem('il-cursor'))")
            lock = sqlite3.connect(workspace_path, timeout=1, isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")
            try:
                page.keyboard.press("d")
                card = page.locator(f".il-card[data-i='{target}']")
                expect(card).to_contain_text("dropped")  # at once, in the browser
                expect(card.locator(".il-failed")).to_contain_text("not saved", timeout=2 * TIMEOUT_MS)
                page.screenshot(path=shots / "gallery-failed-write.png")
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            expect(card.locator(".il-saved")).to_be_attached()
            assert log_rows(workspace)[-1] == (target, "drop")

            # the depth estimate opens on demand (a screenshot for the docs)
            page.get_by_text("How deep to review").click()
            expect(page.locator(".st-key-review_depth_chart .js-plotly-plot")).to_be_visible()
            expect(page.locator("[data-testid='stMetric']", has_text="Review down to")).to_be_visible()
            expect(page.locator("[data-testid='stStatusWidget']")).to_have_count(0)  # the run is over
            page.locator("[data-testid='stExpander']", has_text="How deep to review").scroll_into_view_if_needed()
            page.wait_for_timeout(300)
            page.screenshot(path=shots / "review-depth.png", full_page=False)
            browser.close()
    finally:
        server.stop()
