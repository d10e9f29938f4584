"""What the documentation says is backed: method citations point at sections that exist, and every AUROC
the README's method list quotes is in the committed benchmark summary."""

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = REPO / "docs" / "methods.md"
SUMMARY = REPO / "benchmarks" / "results"


def _sources() -> list[Path]:
    return [p for folder in ("engine", "dashboard", "benchmarks", "tests") for p in (REPO / folder).rglob("*.py")]


def test_method_citations_point_at_sections_of_docs_methods():
    sections = set(re.findall(r"^## (\d+)\. ", METHODS.read_text(), flags=re.M))
    cited = 0
    for path in _sources():
        text = path.read_text()
        outside = re.findall(r"(?<![/\w])" + "METHODS" + r"\.md", text)  # split: this file is searched too
        assert not outside, f"{path.relative_to(REPO)} cites the method notes outside the repository"
        for section in re.findall(r"docs/methods\.md §(\d+)", text):
            assert section in sections, f"{path.relative_to(REPO)} cites docs/methods.md §{section}, which has none"
            cited += 1
    assert cited >= 10


def _method_list() -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Methods, and what the benchmark showed")
    return readme[start:readme.index("\n## ", start + 1)]


def test_every_auroc_the_readme_method_list_quotes_is_in_the_summary():
    summary = json.loads((SUMMARY / "summary.json").read_text())
    means = {m["method"]: round(m["mean_auroc"], 3) for m in summary["methods"]}
    per_setting = {round(v, 3) for m in summary["methods"] for v in m["auroc"].values()}
    table = set(re.findall(r"\b0\.\d{3}\b", (SUMMARY / "summary.md").read_text()))
    listed = [line for line in _method_list().splitlines() if line.startswith("- `")]
    quoted = 0
    for line in listed:
        for method, value in re.findall(r"`([a-z-]+)` \((0\.\d{3})\)", line):
            assert means[method] == float(value), f"README quotes {method} {value}, the summary {means[method]}"
            quoted += 1
        for value in re.findall(r"(?<![\d.])0\.\d{3}(?!\d)", line):
            assert float(value) in per_setting | set(means.values()) or value in table, \
                f"README's method list quotes {value}, which benchmarks/results/summary.* does not hold: {line[:80]}"
    assert quoted == len(means)  # every ranked method, once
