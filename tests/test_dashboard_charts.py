"""The dashboard's pure chart and table builders (no Streamlit running)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from dashboard import charts
from engine.explain import detection_curves
from engine.metrics import detection_metrics, ranks

NAMES = ("zero", "one", "two")


def test_tile_upscales_with_nearest_neighbour_blocks():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    big = charts.tile(gray, 96)
    assert big.shape == (96, 96)
    np.testing.assert_array_equal(big, np.kron(gray, np.ones((12, 12), dtype=np.uint8)))  # crisp 12×12 blocks
    rgb = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    assert charts.tile(rgb, 60).shape == (40, 60, 3)
    assert charts.tile(rgb[..., :1], 12).shape == (8, 12)


@pytest.fixture
def table():
    scores = np.array([0.1, 3.0, 2.0, 0.5, 5.0, 1.0])
    decisions = pd.DataFrame({"index": [11, 14, 99], "action": ["relabel", "drop", "keep"], "new_label": [2, -1, -1],
                              "decided_at": ["t"] * 3})
    ranked = charts.ranked_rows(np.arange(10, 16), scores, np.array([0, 1, 2, 0, 1, 2]), np.array([0, 2, 2, 0, 0, 1]),
                                np.array([1, 2, 2, 0, 0, 1]))
    return charts.gallery_table(ranked, decisions)


def test_gallery_table_is_ranked_with_decision_status(table):
    assert list(table.columns) == charts.GALLERY_COLUMNS
    assert table["index"].tolist() == [14, 11, 12, 15, 13, 10] and table["rank"].tolist() == [1, 2, 3, 4, 5, 6]
    status = dict(zip(table["index"], table["status"], strict=True))
    assert status == {14: "drop", 11: "relabel", 12: "unreviewed", 15: "unreviewed", 13: "unreviewed", 10: "unreviewed"}
    assert table.set_index("index").loc[11, "new_label"] == 2
    assert table.set_index("index").loc[14, "position"] == 4


def test_filter_gallery_matches_brute_force(table):
    shown = charts.filter_gallery(table, top_k=4, given=[1, 2], status=["unreviewed", "drop"])
    brute = [r["index"] for _, r in table.iterrows()
             if r["rank"] <= 4 and r["given"] in (1, 2) and r["status"] in ("unreviewed", "drop")]
    assert shown["index"].tolist() == brute == [14, 12, 15]
    assert charts.filter_gallery(table, cell=(1, 2))["index"].tolist() == [11]
    assert charts.filter_gallery(table, score_range=(0.5, 2.0), suggested=[0, 1])["index"].tolist() == [15, 13]
    assert charts.filter_gallery(table, indices={10, 13})["index"].tolist() == [13, 10]
    assert len(charts.filter_gallery(table)) == 6


def test_page_of_clamps_and_counts(table):
    rows, pages = charts.page_of(table, 2, 4)
    assert pages == 2 and rows["index"].tolist() == [13, 10]
    assert charts.page_of(table, 9, 4)[0]["index"].tolist() == [13, 10]
    assert charts.page_of(table.iloc[:0], 1, 4)[1] == 1


def test_card_caption_names_labels_and_decision(table):
    row = table.iloc[1]  # index 11: given one, predicted two, suggested two, relabeled → two
    text = charts.card_caption(row, NAMES)
    assert "#2" in text and "relabeled → two" in text and charts.DECIDED_MARK in text
    assert "dropped" in charts.card_caption(table.iloc[0], NAMES)
    undecided = table[table["status"] == charts.UNREVIEWED].iloc[0]
    text = charts.card_caption(undecided, NAMES)
    assert f"{NAMES[undecided['given']]} → **{NAMES[undecided['suggested']]}**" in text
    assert charts.DECIDED_MARK not in text


def test_score_histogram_marks_the_cut():
    scores = np.random.default_rng(0).normal(size=100_000)
    fig = charts.score_histogram(scores, 1.5, method="loss", flagged=5)
    assert len(fig.data[0].x) == 60 and sum(fig.data[0].y) == len(scores)  # binned: 60 bars, not 100k scores
    left = fig.data[0].x - fig.data[0].width / 2
    assert np.isclose(left[0], scores.min()) and np.sum(scores < left[30]) == sum(fig.data[0].y[:30])
    fig = charts.score_histogram(np.arange(20.0), 15.0, method="loss", flagged=5)
    assert fig.layout.shapes[0].x0 == 15.0 and "top 5" in fig.layout.annotations[0].text


def test_confusion_figure_has_one_clickable_square_per_nonzero_cell():
    counts = np.array([[0, 2, 0], [0, 1, 0], [3, 0, 0]])
    fig = charts.confusion_figure(counts, NAMES)
    points = {tuple(c): int(t) for c, t in zip(fig.data[0].customdata, fig.data[0].text, strict=True)}
    assert points == {(0, 1): 2, (1, 1): 1, (2, 0): 3}
    assert list(fig.data[0].y) == ["zero", "one", "two"] and list(fig.data[0].x) == ["one", "one", "zero"]


def test_point_customdata_reads_every_browser_shape():
    assert charts.point_customdata({"customdata": {"1": 2, "0": 0}, "x": "2"}) == [0, 2]  # 2-D row, as sent
    assert charts.point_customdata({"customdata": [3, 4]}) == [3, 4]
    assert charts.point_customdata({"customdata": 17}) == [17]


def test_feature_map_figure_covers_every_sample_once_and_highlights_flagged():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 50)
    flagged = rng.random(50) < 0.2
    index = np.arange(100, 150)
    fig = charts.feature_map_figure(rng.normal(size=(50, 2)), labels, index, flagged, NAMES)
    seen = np.concatenate([t.customdata for t in fig.data])
    assert sorted(seen.tolist()) == index.tolist()
    outlined = np.concatenate([t.customdata for t in fig.data if t.marker.line.width])
    assert sorted(outlined.tolist()) == index[flagged].tolist()
    assert isinstance(fig.data[0], go.Scatter) and fig.layout.dragmode == "lasso"
    many = charts.feature_map_figure(np.zeros((charts.WEBGL_ABOVE + 1, 2)), np.zeros(charts.WEBGL_ABOVE + 1, int),
                                     np.arange(charts.WEBGL_ABOVE + 1), np.zeros(charts.WEBGL_ABOVE + 1, bool), NAMES)
    assert isinstance(many.data[0], go.Scattergl)


def test_probability_figure_colours_given_and_suggested():
    fig = charts.probability_figure(np.array([0.2, 0.7, 0.1]), NAMES, given=0, suggested=1)
    assert list(fig.data[0].marker.color) == ["#d62728", "#2ca02c", "#9e9e9e"]
    assert list(fig.data[0].y) == [0.2, 0.7, 0.1]


def test_method_table_uses_the_engine_ranks():
    scores = {"loss": np.array([0.1, 0.9, 0.5]), "margin": np.array([3.0, 1.0, 2.0])}
    suggested = {"loss": np.array([1, 2, 0]), "margin": np.array([2, 2, 2])}
    table = charts.method_table(scores, suggested, 2, NAMES)
    assert table.values.tolist() == [["loss", 0.5, int(ranks(scores["loss"])[2]), 3, "zero"],
                                     ["margin", 2.0, 2, 3, "two"]]


def test_recovery_figures():
    fig = charts.class_accuracy_figure([0.5, None, 1.0], [0.75, None, 1.0], NAMES)
    assert [t.name for t in fig.data] == ["before", "after"] and list(fig.data[1].y) == [0.75, None, 1.0]
    curve = pd.DataFrame({"curve": ["loss", "loss", charts.ORACLE, charts.ORACLE], "fixed": [0, 5, 0, 5],
                          "accuracy": [0.8, 0.85, 0.8, 0.9]})
    fig = charts.cleaning_curve_figure(curve)
    assert [t.name for t in fig.data] == ["loss", charts.ORACLE]
    assert fig.data[1].line.dash == "dash" and list(fig.data[1].y) == [0.8, 0.9]


def test_comparison_figures_and_table():
    rng = np.random.default_rng(2)
    noisy = rng.random(100) < 0.2
    scores = {"good": noisy + rng.normal(0, 0.3, 100), "random": rng.normal(size=100)}
    metrics = {m: detection_metrics(s, noisy) for m, s in scores.items()}
    curves = {m: detection_curves(s, noisy) for m, s in scores.items()}
    roc = charts.roc_figure(curves, {m: v["auroc"] for m, v in metrics.items()})
    assert [t.name for t in roc.data][:2] == [f"good ({metrics['good']['auroc']:.3f})",
                                              f"random ({metrics['random']['auroc']:.3f})"]
    pr = charts.pr_figure(curves, {m: v["ap"] for m, v in metrics.items()}, float(noisy.mean()))
    assert len(pr.data) == 2 and pr.layout.shapes[0].y0 == pytest.approx(noisy.mean())
    found = charts.found_figure(curves, int(noisy.sum()), 100)
    assert [t.name for t in found.data] == ["good", "random", "perfect", "random"]
    assert list(found.data[2].y) == [0, noisy.sum(), noisy.sum()]
    table = charts.metrics_table(metrics)
    assert table["method"].tolist() == ["good", "random"]
    assert table.loc[0, "AUROC"] == metrics["good"]["auroc"]
    assert table.loc[0, "precision@k"] == metrics["good"]["precision_at_k"]


def test_rank_change_figure_and_table():
    before, after = np.array([1, 2, 3, 4, 5]), np.array([5, 1, 2, 3, 4])
    reviewed = np.array([True, False, False, False, False])
    flipped = np.array([False, False, True, False, True])
    fig = charts.rank_change_figure(before, after, reviewed, flipped)
    assert [t.name for t in fig.data] == ["reviewed", "not reviewed, label correct", "not reviewed, label error",
                                          "unchanged"]
    assert list(fig.data[2].x) == [3, 5] and list(fig.data[2].y) == [2, 4]
    assert [t.name for t in charts.rank_change_figure(before, after, reviewed).data][:2] == ["reviewed", "not reviewed"]
    table = charts.rank_change_table(np.arange(10, 15), before, after, np.array([0, 1, 2, 0, 1]), NAMES,
                                     among=~reviewed, top=2)
    assert table["index"].tolist() == [11, 12] and table["climbed"].tolist() == [1, 1]
    assert table["given"].tolist() == ["one", "two"]


def test_review_depth_figure_marks_the_stop_and_thins_long_curves():
    from engine.guidance import estimate_review_depth

    rng = np.random.default_rng(0)
    prob = rng.beta(0.3, 2.0, size=30_000)
    estimate = estimate_review_depth(prob, prob, threshold=0.5)
    fig = charts.review_depth_figure(estimate, 0.5, cut=3000)
    precision, marginal = fig.data
    assert len(precision.x) <= charts.MAX_CURVE_POINTS and precision.x[0] == 1 and precision.x[-1] == 30_000
    np.testing.assert_allclose(precision.y, estimate.precision[np.asarray(precision.x) - 1])
    np.testing.assert_allclose(marginal.y, estimate.marginal[np.asarray(marginal.x) - 1])
    lines = {shape.line.color: shape.x0 for shape in fig.layout.shapes if shape.x0 == shape.x1}
    assert lines[charts.PALETTE[3]] == estimate.stop_depth and lines["black"] == 3000


def test_metric_delta_is_the_difference_of_the_figures_shown():
    before, after = 0.9166, 0.9474  # issue 12: shown "+3.1" (the unrounded 3.08) between 91.7% and 94.7%
    assert f"{before:.1%}" == "91.7%" and f"{after:.1%}" == "94.7%"
    assert charts.metric_delta(before, after, digits=1, scale=100, unit=" pts") == "+3.0 pts"
    assert charts.metric_delta(0.9501, 0.9449, digits=3) == "-0.005"


def test_metric_delta_is_none_when_the_figures_shown_are_equal():
    assert charts.metric_delta(0.99912, 0.99949, digits=3) is None  # both read 0.999: no "+0.000", no arrow
    assert charts.metric_delta(0.5, 0.5, digits=1, scale=100) is None


def test_confusion_counts_are_readable_on_dark_and_light_squares():
    counts = np.array([[0, 120, 0], [0, 3, 0], [118, 0, 0]])
    fig = charts.confusion_figure(counts, NAMES)
    colour = dict(zip(fig.data[0].text, fig.data[0].textfont.color, strict=True))
    assert colour["120"] == colour["118"] == "white" and colour["3"] != "white"
    assert fig.data[0].marker.cmin == 0  # the smallest count is not drawn white (its text would vanish)
    many = tuple(f"class {c}" for c in range(20))
    tall = charts.confusion_figure(np.eye(20, dtype=int), many)
    assert tall.layout.height >= 20 * fig.data[0].marker.size  # 20 rows of squares fit without overlapping


def test_class_counts_table_is_largest_first_with_shares():
    table = charts.class_counts_table(("a", "b", "c"), (2, 6, 2))
    assert table["class"].tolist() == ["b", "a", "c"] and table["images"].tolist() == [6, 2, 2]
    assert table["share"].tolist() == [0.6, 0.2, 0.2]


def test_runs_table_names_methods_validation_source_and_dates():
    runs = [{"last_used": "2026-12-06T02:50:11", "created": "2026-12-05T10:00:00", "methods": ["fvm", "loss"],
             "settings": {"data": "sample", "validation": "/tmp/ws/digits-validation-ab12.npz", "noise_rate": 0.2,
                          "noise_kind": "pair", "epochs": 15, "preset": "fast-cpu"},
             "workspace": "w.sqlite", "run": "k1"},
            {"last_used": "2026-12-05T09:00:00", "created": "2026-12-05T09:00:00", "methods": [],
             "settings": {"data": "/x", "val_from_train": 0.1}, "workspace": "x.sqlite", "run": "k2"}]
    table = charts.runs_table(runs)
    assert table["methods"].tolist() == ["fvm, loss", "(none yet)"]
    assert table["validation"].tolist() == ["trusted: digits-validation-ab12.npz", "carved 10% (untrusted)"]
    assert table["created"].tolist() == ["2026-12-05 10:00", "2026-12-05 09:00"]
    assert table["noise"].tolist() == ["20% pair", "none"] and table["run"].tolist() == ["k1", "k2"]
    assert charts.validation_source({}) == "none"
    assert table["differs"].tolist() == ["", ""]  # alone on their data: nothing to tell apart


def test_two_runs_on_one_folder_say_what_differs():
    """Issue 17, finding 10: two runs on one folder looked identical in the runs table."""
    base = {"data": "/photos", "epochs": 15, "preset": "fast-cpu", "seed": 0, "image_size": 32}
    runs = [{"last_used": "2026-12-06T02:50:11", "created": "2026-12-05T10:00:00", "methods": ["loss"],
             "settings": {**base, "seed": 1}, "workspace": "w.sqlite", "run": "k1"},
            {"last_used": "2026-12-05T09:00:00", "created": "2026-12-05T10:00:00", "methods": ["loss"],
             "settings": {**base, "image_size": 64}, "workspace": "w.sqlite", "run": "k2"},
            {"last_used": "2026-12-05T08:00:00", "created": "2026-12-05T08:00:00", "methods": ["loss"],
             "settings": {"data": "sample", "epochs": 15}, "workspace": "s.sqlite", "run": "k3"}]
    table = charts.runs_table(runs)
    assert table["differs"].tolist() == ["image_size 32, seed 1", "image_size 64, seed 0", ""]
