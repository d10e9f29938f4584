"""How long a long job will take on this device, said before its button is pressed (set-up page, cleaning
curve, close the loop, the guided demo). The throughput is measured by ``engine.preflight``; here it is
only cached and put in words."""

from __future__ import annotations

import json
from dataclasses import asdict

import streamlit as st

from engine.config import TrainConfig
from engine.preflight import TimeEstimate, estimate_run_time


@st.cache_data(max_entries=32, show_spinner="Measuring this device's training speed…")
def _estimate(n: int, image_shape: tuple[int, ...], num_classes: int, config_json: str,
              methods: tuple[str, ...]) -> TimeEstimate:
    return estimate_run_time(n, image_shape, num_classes, TrainConfig(**json.loads(config_json)), methods)


def run_time(n: int, image_shape: tuple[int, ...], num_classes: int, config: TrainConfig,
             methods: tuple[str, ...] | list[str] = ()) -> TimeEstimate:
    """:func:`engine.preflight.estimate_run_time`, measured once per shape and recipe."""
    return _estimate(n, tuple(image_shape), num_classes, json.dumps(asdict(config), sort_keys=True), tuple(methods))


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


def trainings_line(trainings: float, estimate: TimeEstimate, *, what: str) -> str:
    """"Estimated time on this device: ≈ T (N trainings of ≈ t each …)" for a job of ``trainings`` trainings."""
    return (f"Estimated time on this device: **≈ {duration(trainings * estimate.training_seconds)}** ({what}: "
            f"{trainings:g} training{'s' if trainings != 1 else ''} of ≈ {duration(estimate.training_seconds)} at "
            f"{estimate.images_per_second:,.0f} images/s measured with {estimate.model}).")
