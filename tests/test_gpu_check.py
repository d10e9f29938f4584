"""benchmarks/gpu_check.sh --tiny: the GPU script's every step on a few hundred CIFAR-10 images on
the CPU, so that the script a lent GPU will run cannot rot unnoticed."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))  # `benchmarks` is a folder of scripts, not an installed package
from benchmarks.common import DEFAULT_ROOTS  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not any((root / "cifar10_train_jpegq75.bin").is_file() for root in DEFAULT_ROOTS),
                    reason="the shared CIFAR-10 data is not here")
def test_tiny_gpu_check_writes_one_json_per_figure(tmp_path):
    root = next(root for root in DEFAULT_ROOTS if (root / "cifar10_train_jpegq75.bin").is_file())
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_DATA": str(root), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--tiny"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detection.json", "detection.md", "environment.json",
                                                          "gpu_tests.json", "speed.json"]
    environment = json.loads((tmp_path / "environment.json").read_text())
    assert environment["mode"] == "tiny" and all(s["exit_code"] == 0 for s in environment["steps"].values())
    tests = json.loads((tmp_path / "gpu_tests.json").read_text())["tests"]
    assert tests and all(t["outcome"] in ("passed", "skipped") for t in tests)
    speed = {m.get("measure") for m in json.loads((tmp_path / "speed.json").read_text())["measurements"]}
    assert {"plain forward+backward", "tracin (ours, all layers)", "torch.func vmap(grad), final model"} <= speed
    rows = json.loads((tmp_path / "detection.json").read_text())["rows"]
    detection = {r["method"]: r for r in rows if r["kind"] == "detection"}
    assert sorted(detection) == ["cleanlab", "fvm", "loss", "tracin", "vm-loss"]
    assert all(0 <= r["auroc"] <= 1 and r["seconds"] > 0 and "relabel_top1" in r for r in detection.values())
