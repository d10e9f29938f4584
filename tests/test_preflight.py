"""engine.preflight: the data preview agrees with what loading gives, and the time estimate's arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_dataset, save_image, write_image_folder, write_manifest

from engine.config import TrainConfig
from engine.data import load_dataset
from engine.errors import DataError, InfluenceLensError
from engine.preflight import estimate_run_time, preview_data


def test_folder_preview_matches_what_loading_gives(tmp_path):
    data = make_dataset(classes=3, per_class=5, shape=(12, 12))
    root = write_image_folder(data, tmp_path / "folder")
    save_image(np.zeros((16, 20), dtype=np.uint8), root / "class_1" / "odd_size.png")  # one of another size
    preview = preview_data(str(root))
    loaded = load_dataset(root)
    assert preview.class_names == loaded.class_names
    assert preview.counts == tuple(np.bincount(loaded.labels).tolist()) == (5, 6, 5)
    assert preview.image_shape == loaded.image_shape == (12, 12)
    assert preview.sizes == {"12×12": 15, "20×16": 1} and preview.resized == 1
    assert any("resized 1 of 16" in note for note in loaded.notes)


def test_manifest_and_sample_previews(tmp_path):
    data = make_dataset(classes=2, per_class=4, shape=(8, 8, 3))
    preview = preview_data(str(write_manifest(data, tmp_path / "labels.csv")))
    assert preview.counts == (4, 4) and preview.image_shape == (8, 8, 3) and preview.resized == 0
    sample = preview_data("sample")
    assert sample.images == len(load_dataset("sample")) and len(sample.class_names) == 10


def test_preview_of_a_missing_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        preview_data(str(tmp_path / "nowhere"))


def test_time_estimate_scales_the_measured_throughput():
    config = TrainConfig(epochs=7, batch_size=16, device="cpu")
    estimate = estimate_run_time(1000, (12, 12), 3, config, ["loss", "cleanlab"])
    assert estimate.images_per_second > 0 and estimate.model == "small-cnn" and estimate.device == "cpu"
    assert estimate.training_seconds == pytest.approx(7 * 1000 / estimate.images_per_second)
    assert estimate.method_seconds == {"cleanlab": pytest.approx(4 * estimate.training_seconds)}  # 5 folds on 4/5
    assert estimate.total_seconds == pytest.approx(5 * estimate.training_seconds)


def test_a_frozen_backbone_is_estimated_as_one_pass_of_the_backbone_and_a_head(tmp_path):
    """The estimate once said ≈ 5 min for a frozen-backbone run that took 28 s: it timed the small CNN
    training on the images. Now the backbone's pass is timed and the head trains on feature rows."""
    import torch

    class Pool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    torch.jit.save(torch.jit.script(Pool()), str(tmp_path / "pool.pt"))
    config = TrainConfig(epochs=7, batch_size=16, device="cpu", backbone=str(tmp_path / "pool.pt"))
    estimate = estimate_run_time(5000, (32, 32, 3), 3, config, ["loss", "cleanlab"])
    assert estimate.model == "linear" and estimate.feature_seconds > 0
    assert estimate.training_seconds == pytest.approx(7 * 5000 / estimate.images_per_second)
    assert estimate.method_seconds == {"cleanlab": pytest.approx(4 * estimate.training_seconds)}  # folds: the head
    assert estimate.total_seconds == pytest.approx(estimate.feature_seconds + 5 * estimate.training_seconds)
    scratch = estimate_run_time(5000, (32, 32, 3), 3, TrainConfig(epochs=7, batch_size=16, device="cpu"), [])
    assert scratch.model == "small-cnn" and scratch.feature_seconds == 0


def test_no_estimate_for_images_too_large_to_train_on_here(monkeypatch):
    """A probe batch the allocator refuses is an InfluenceLensError (the set-up page then shows no
    estimate and its Run refuses with the memory figures), not a traceback."""
    import engine.preflight

    def refuse(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 137438953472 bytes")

    monkeypatch.setattr(engine.preflight, "train", refuse)
    with pytest.raises(InfluenceLensError, match="does not fit in memory"):
        estimate_run_time(10, (512, 512, 3), 3, TrainConfig(device="cpu"))  # a 96 MB probe, refused by "torch"


def test_no_estimate_when_the_probe_itself_would_not_fit(monkeypatch):
    """128 random images of 4096² RGB are 6 GiB: refused before anything is allocated."""
    monkeypatch.setenv("INFLUENCE_LENS_MEMORY_BUDGET", "64M")
    with pytest.raises(InfluenceLensError, match="more than the memory budget"):
        estimate_run_time(10, (4096, 4096, 3), 3, TrainConfig(device="cpu"))
