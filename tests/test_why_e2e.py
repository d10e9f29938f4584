"""The "Why it works" page in headless Chromium: prepare the quick demo from the page, watch it
finish in the background, see the four steps (three charts and the flagged images), and see a
browser reload draw them straight from the cache.

Reuses the server and browser fixtures of ``test_dashboard_e2e`` (skipped, with the reason, without
Chromium or Playwright). Screenshots go to ``$E2E_SCREENSHOTS`` (default: the test's temporary folder).
"""

from __future__ import annotations

import pytest
from test_dashboard_e2e import TIMEOUT_MS, expect, page, server, shots_dir  # noqa: F401 (fixtures)

from engine.demo import DemoSettings

pytestmark = pytest.mark.e2e
STEPS = ("why_budgets", "why_landscape", "why_top", "why_recovery")


def expect_four_steps(tab) -> None:
    for step in STEPS:
        expect(tab.locator(f".st-key-{step}")).to_be_visible()
    for step in ("why_budgets", "why_landscape", "why_recovery"):
        expect(tab.locator(f".st-key-{step} .js-plotly-plot")).to_be_visible()
    expect(tab.locator(".st-key-why_top img")).to_have_count(DemoSettings().quick().top)


def test_quick_demo_prepares_then_shows_the_four_steps(server, page, tmp_path):  # noqa: F811
    shots = shots_dir(tmp_path)
    page.goto(f"{server.url}/why")
    page.get_by_text("Demo settings").click()
    page.locator(".st-key-why_quick label").click()
    expect(page.locator(".st-key-why_quick input")).to_be_checked()
    prepare = page.locator(".st-key-why_prepare button")
    expect(prepare).to_be_enabled()
    page.screenshot(path=shots / "why-0-before.png")
    prepare.click()
    expect(page.get_by_text("Preparing the demo")).to_be_visible()
    expect(page.locator("[data-testid='stProgress']").first).to_be_visible()
    page.screenshot(path=shots / "why-0-progress.png")

    expect(page.locator(".st-key-why_recovery .js-plotly-plot")).to_be_visible(timeout=3 * TIMEOUT_MS)
    expect_four_steps(page)
    for step in STEPS:
        page.locator(f".st-key-{step}").screenshot(path=shots / f"{step.replace('_', '-')}.png")
    assert list((server.folder / "workspaces" / "demo").glob("demo-*.json"))

    page.reload()  # a new session: the toggle is off again, turn it on and the cached demo is there at once
    page.get_by_text("Demo settings").click()
    page.locator(".st-key-why_quick label").click()
    expect_four_steps(page)
    expect(page.locator(".st-key-why_prepare")).to_have_count(0)
