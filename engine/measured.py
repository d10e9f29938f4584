"""What the detection benchmark measured, read by the dashboard for its defaults.

``benchmarks/detection.py`` writes ``benchmarks/results/summary.json`` from its committed tables and a
copy here, ``engine/measured_methods.json``, shipped with the package so that an installed dashboard
can read it. The methods are ranked by their mean AUROC over the settings in that table (the
settings each was measured on are listed beside it): the defaults follow the measurements, not a
method's name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MEASURED_FILE = Path(__file__).with_name("measured_methods.json")


@dataclass(frozen=True)
class MeasuredMethod:
    """One method's row of the committed benchmark summary."""

    method: str
    mean_auroc: float  # over ``auroc``'s settings
    auroc: dict[str, float]  # setting → AUROC
    mean_relabel_top1: float | None = None  # over the settings with a known right label, if any


def measured_methods(path: str | Path | None = None) -> list[MeasuredMethod]:
    """The measured methods in ``path`` (default :data:`MEASURED_FILE`), best first: those measured on
    the most settings, by mean AUROC (a method measured only on the easy settings cannot outrank one
    measured on all). Empty if there is no readable summary."""
    try:
        rows = json.loads(Path(path or MEASURED_FILE).read_text(encoding="utf-8"))["methods"]
    except (OSError, ValueError, KeyError):
        return []
    measured = [MeasuredMethod(r["method"], float(r["mean_auroc"]), {k: float(v) for k, v in r["auroc"].items()},
                               r.get("mean_relabel_top1")) for r in rows]
    return sorted(measured, key=lambda m: (-len(m.auroc), -m.mean_auroc, m.method))


def recommended_methods(candidates: Iterable[str], count: int | None = None, *,
                        path: str | Path | None = None) -> list[str]:
    """``candidates`` in the order of the benchmark table (best measured first), the unmeasured ones
    after them in their given order; the first ``count`` if given."""
    candidates = list(dict.fromkeys(candidates))
    rank = {m.method: i for i, m in enumerate(measured_methods(path))}
    ordered = sorted(candidates, key=lambda name: (rank.get(name, len(rank)), candidates.index(name)))
    return ordered if count is None else ordered[:count]
