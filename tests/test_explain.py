"""engine.explain (neighbours, maps, confusion, curves, cleaning curve) and engine.runs (cached runs)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_dataset

from engine.config import TrainConfig
from engine.data import save_npz
from engine.explain import class_confusion, cleaning_curves, detection_curves, explain, feature_map, fix_top, nearest
from engine.metrics import detection_metrics
from engine.runs import RunSettings, config_hash, load_run_data, score_into
from engine.workspace import Workspace


def test_nearest_matches_brute_force_cosine():
    rng = np.random.default_rng(0)
    pool, query = rng.normal(size=(40, 5)), rng.normal(size=5)
    mask = rng.random(40) < 0.5
    positions, sims = nearest(query, pool, 4, among=mask)
    brute = sorted(((float(p @ query / np.linalg.norm(p) / np.linalg.norm(query)), i)
                    for i, p in enumerate(pool) if mask[i]), reverse=True)[:4]
    assert positions.tolist() == [i for _, i in brute]
    np.testing.assert_allclose(sims, [s for s, _ in brute])


def test_explain_splits_neighbours_by_label_and_excludes_the_sample():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(30, 4))
    labels = np.repeat([0, 1, 2], 10)
    features[5] = features[12] * 2  # row 12 (label 1) is row 5's twin
    why = explain(5, features=features, labels=labels, suggested=1, val_features=features[:7], k=3)
    assert 5 not in why.same_given[0] and set(labels[why.same_given[0]]) == {0}
    assert why.same_suggested[0][0] == 12 and set(labels[why.same_suggested[0]]) == {1}
    assert why.validation[0][0] == 5 and why.validation[1][0] == pytest.approx(1.0)
    assert len(explain(5, features=features, labels=labels, suggested=1).validation[0]) == 0


def test_feature_map_is_two_dimensional_and_separates_clusters():
    rng = np.random.default_rng(2)
    features = np.concatenate([rng.normal(0, 0.1, (20, 8)), rng.normal(3, 0.1, (20, 8))])
    for method in ("pca", "tsne"):
        xy = feature_map(features, method=method)
        assert xy.shape == (40, 2)
        gap = np.linalg.norm(xy[:20].mean(0) - xy[20:].mean(0))
        assert gap > 3 * max(xy[:20].std(0).max(), xy[20:].std(0).max())
    with pytest.raises(ValueError, match="unknown map method"):
        feature_map(features, method="umap")


def test_class_confusion_counts_pairs():
    counts = class_confusion(np.array([0, 0, 1, 2, 2, 2]), np.array([1, 1, 1, 0, 2, 0]), 3)
    assert counts.tolist() == [[0, 2, 0], [0, 1, 0], [2, 0, 1]]


def test_detection_curves_agree_with_the_metrics():
    rng = np.random.default_rng(3)
    noisy = rng.random(200) < 0.2
    scores = noisy + rng.normal(0, 0.7, 200)
    curves = detection_curves(scores, noisy)
    assert np.trapezoid(curves["roc"]["tpr"], curves["roc"]["fpr"]) == pytest.approx(
        detection_metrics(scores, noisy)["auroc"])
    found = curves["found"]
    order = np.argsort(-scores)
    assert found["found"].tolist() == [0] + np.cumsum(noisy[order]).tolist()
    assert found["found"].iloc[-1] == noisy.sum()


def test_fix_top_relabels_only_changed_rows():
    data = make_dataset(classes=3, per_class=2)  # labels 0 0 1 1 2 2
    scores = np.array([0.1, 5.0, 0.3, 4.0, 3.0, 0.2])
    fix = np.array([0, 2, 1, 1, 0, 2])
    decisions = fix_top(data, scores, 3, fix)  # top 3: rows 1, 3, 4; row 3 already has label 1
    assert decisions.values.tolist() == [[1, "relabel", 2], [4, "relabel", 0]]


def test_cleaning_curve_oracle_recovers_and_shares_the_unfixed_point():
    clean = make_dataset(classes=3, per_class=16, seed=0)
    test = make_dataset(classes=3, per_class=10, seed=5)
    flipped = np.zeros(len(clean), dtype=bool)
    flipped[:12] = True  # 12 of the 16 class-0 rows say "class 1": the model learns the wrong class
    noisy = clean.with_labels(np.where(flipped, 1, clean.labels))
    calls = []
    # no augmentation: the class is the row of a band, which a translation would blur
    config = TrainConfig(epochs=8, batch_size=8, augment="none", seed=0)
    curve = cleaning_curves(noisy, test, {"oracle": (flipped.astype(float), clean.labels),
                                          "clean-first": (-flipped.astype(float), clean.labels)},
                            depths=[0, 12], config=config, progress=lambda d, t, m: calls.append(m))
    acc = curve.set_index(["curve", "fixed"])["accuracy"]
    assert curve["relabeled"].tolist() == [0, 12, 0, 0]
    assert acc["oracle", 0] == acc["clean-first", 0] == acc["clean-first", 12] < 0.7
    assert acc["oracle", 12] == 1.0
    assert sum("top" in m for m in calls) == 2  # three points share one decision set: trained once


@pytest.fixture
def tiny_npz(tmp_path):
    path = tmp_path / "tiny.npz"
    save_npz(make_dataset(classes=3, per_class=10), path)
    return str(path)


def test_score_into_stores_results_and_computes_only_missing_methods(tmp_path, tiny_npz):
    settings = RunSettings(data=tiny_npz, noise_rate=0.2, epochs=2, val_from_train=0.2)
    data = load_run_data(settings)
    assert len(data.train) + len(data.validation) == len(data.full_train) == 30
    assert not data.validation_trusted and len(data.flipped) == len(data.train)
    np.testing.assert_array_equal(data.flipped, data.train.labels != data.clean_labels)
    workspace = Workspace.for_data(settings.data_key(), tmp_path / "ws")
    key, trained = score_into(workspace, settings, data, ["loss"])
    assert trained is not None and list(workspace.results(key)) == ["loss"]
    arrays = workspace.arrays(key)
    np.testing.assert_array_equal(arrays["index"], data.train.index)
    assert arrays["features"].shape[0] == len(data.train) and arrays["val_features"].shape[0] == len(data.validation)
    again, model = score_into(workspace, settings, data, ["loss"])
    assert again == key and model is None  # cached: nothing trained
    score_into(workspace, settings, data, ["loss", "margin"], trained=trained)
    assert sorted(workspace.results(key)) == ["loss", "margin"]
    assert config_hash(RunSettings(data=tiny_npz, noise_rate=0.2, epochs=3, val_from_train=0.2), data) != key


def test_run_settings_key_the_workspace_by_labelled_data(tiny_npz):
    assert RunSettings().test_spec == "sample:test" and RunSettings(data=tiny_npz).test_spec is None
    assert RunSettings(noise_rate=0.1).data_key() != RunSettings().data_key() == "sample"
    assert RunSettings(epochs=3).data_key() == "sample"
    assert RunSettings(preset="full-gpu").train_config().model == "resnet18"
    with pytest.raises(Exception, match="preset"):
        RunSettings(preset="huge").validate()


def test_reviewed_validation_adds_confirmed_and_relabeled_samples(tiny_npz):
    import pandas as pd

    from engine.errors import DataError
    from engine.runs import reviewed_validation

    data = load_run_data(RunSettings(data=tiny_npz, validation=tiny_npz))
    decisions = pd.DataFrame({"index": [2, 5, 7, 99], "action": ["keep", "relabel", "drop", "relabel"],
                              "new_label": [-1, 0, -1, 1], "decided_at": ["t"] * 4})
    grown = reviewed_validation(data, decisions)
    n = len(data.validation)
    assert len(grown) == n + 2 and grown.index.tolist() == list(range(n + 2))
    np.testing.assert_array_equal(grown.images[n:], data.train.images[[2, 5]])
    assert grown.labels[n:].tolist() == [data.train.labels[2], 0]  # confirmed keeps its label, relabeled takes the new
    carved = load_run_data(RunSettings(data=tiny_npz, val_from_train=0.2))
    kept = [i for i in (2, 5) if i in carved.train.index]
    if kept:  # the carved (untrusted) validation set is left out: only the reviewed rows remain
        assert len(reviewed_validation(carved, decisions)) == len(kept)
    with pytest.raises(DataError, match="no reviewed samples"):
        reviewed_validation(data, decisions[decisions["action"] == "drop"])


def test_the_dashboards_engine_modules_do_not_import_streamlit():
    import subprocess
    import sys

    code = "import sys, engine.explain, engine.runs, engine.workspace; print('streamlit' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_a_large_map_draws_a_seeded_sample_of_its_rows():
    from engine.explain import map_rows

    np.testing.assert_array_equal(map_rows(500, limit=1000), np.arange(500))
    rows = map_rows(1_000_000)
    assert len(rows) == 20_000 and len(np.unique(rows)) == 20_000 and (np.diff(rows) > 0).all()
    assert rows.max() > 900_000 and rows.min() < 100_000  # drawn over the whole run, not its start
    np.testing.assert_array_equal(rows, map_rows(1_000_000))  # the same map on every visit
