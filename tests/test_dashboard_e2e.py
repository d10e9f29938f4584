"""The real dashboard in headless Chromium: start `influence-lens dashboard`, run a fast scoring,
relabel from the gallery, find the decision in the SQLite file, reload, and see it still there.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium chromium-driver``);
skipped with the reason when they are absent. Screenshots of each step go to ``$E2E_SCREENSHOTS``
(default: the test's temporary folder).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from engine.workspace import Workspace

pytestmark = pytest.mark.e2e
CHROMEDRIVER = "/usr/bin/chromedriver"
BROWSER_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1600,1300")

if shutil.which("chromium") is None or not Path(CHROMEDRIVER).exists():
    pytest.skip("Debian's chromium and chromium-driver are not installed "
                "(apt-get install -y chromium chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


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
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    for argument in BROWSER_ARGS:
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def shots_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("E2E_SCREENSHOTS", tmp_path / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait_for(driver, css: str, timeout: float = 120):
    WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))
    return driver.find_elements(By.CSS_SELECTOR, css)


def wait_idle(driver, timeout: float = 60) -> None:
    """Until Streamlit has finished the current script run (no running indicator)."""
    time.sleep(0.5)
    WebDriverWait(driver, timeout).until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, "[data-testid='stStatusWidget']"))


def card_text(driver, index: int) -> str:
    """The card's text, or "" while Streamlit is re-rendering it."""
    try:
        return driver.find_element(By.CSS_SELECTOR, f".st-key-card_{index}").text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def test_fast_run_relabel_persists_across_reload_and_restart(server, browser, tmp_path):
    shots = shots_dir(tmp_path)
    started = time.time()
    browser.get(server.url)
    wait_for(browser, ".st-key-run button")
    # one fast method (drop the other defaults), 2 epochs; the demo noise is on for the sample data
    for remove in browser.find_elements(By.CSS_SELECTOR, ".st-key-setup_methods button[aria-label^='Remove']"):
        if remove.get_attribute("aria-label") != "Remove loss":
            remove.click()
            wait_idle(browser)
    labels = [t.text for t in browser.find_elements(By.CSS_SELECTOR, ".st-key-setup_methods [data-tag] span[title]")]
    assert labels == ["loss"]
    epochs = browser.find_element(By.CSS_SELECTOR, ".st-key-setup_epochs_fast-cpu input")
    epochs.send_keys(Keys.CONTROL, "a")
    epochs.send_keys("2", Keys.TAB)
    wait_idle(browser)
    browser.save_screenshot(str(shots / "1-setup.png"))
    browser.find_element(By.CSS_SELECTOR, ".st-key-run button").click()

    WebDriverWait(browser, 180).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "[class*='st-key-card_']")) >= 24)
    first_gallery_seconds = time.time() - started
    wait_idle(browser)
    assert len(browser.find_elements(By.CSS_SELECTOR, "[class*='st-key-card_']")) == 24  # one page
    assert browser.find_elements(By.CSS_SELECTOR, "[class*='st-key-card_'] img")
    browser.save_screenshot(str(shots / "2-gallery.png"))

    accept = next(b for b in browser.find_elements(By.CSS_SELECTOR, "[class*='st-key-accept_'] button")
                  if b.is_enabled())
    key = next(c for c in accept.find_element(By.XPATH, "./ancestor::div[contains(@class, 'st-key-accept_')]")
               .get_attribute("class").split() if c.startswith("st-key-accept_"))
    index = int(key.removeprefix("st-key-accept_"))
    new_label = accept.text.strip().lstrip("✓").strip()
    accept.click()
    WebDriverWait(browser, 180).until(lambda d: "relabeled" in card_text(d, index))
    browser.save_screenshot(str(shots / "3-relabeled.png"))

    (workspace_path,) = (server.folder / "workspaces").glob("*.sqlite")
    decisions = Workspace(workspace_path).decisions()
    assert decisions[["index", "action"]].values.tolist() == [[index, "relabel"]]
    assert str(decisions["new_label"][0]) == new_label  # the sample data's class names are the digits

    browser.refresh()
    wait_for(browser, f".st-key-card_{index}")
    WebDriverWait(browser, 180).until(lambda d: f"relabeled → {new_label}" in card_text(d, index))

    server.stop()  # a server restart loses nothing either
    server.start()
    browser.refresh()
    wait_for(browser, f".st-key-card_{index}")
    WebDriverWait(browser, 180).until(lambda d: f"relabeled → {new_label}" in card_text(d, index))
    browser.save_screenshot(str(shots / "4-after-restart.png"))

    browser.get(f"{server.url}/recovery")  # journey 4: retrain with the decision applied
    wait_for(browser, ".st-key-retrain button")[0].click()
    WebDriverWait(browser, 300).until(lambda d: any(
        "Test accuracy after" in m.text for m in d.find_elements(By.CSS_SELECTOR, "[data-testid='stMetric']")))
    wait_idle(browser)
    browser.save_screenshot(str(shots / "5-recovery.png"))
    report = Workspace(workspace_path).report(Workspace(workspace_path).runs()["config_hash"][0], "retrain")
    assert report["n_relabeled"] == 1
    print(f"launch to first gallery: {first_gallery_seconds:.1f} s; screenshots in {shots}")
