"""The out-of-core data path: data larger than the memory budget is read per batch, with the same
results as when it is decoded into memory; the feature stage resumes at any chunk; the memory a run
takes does not follow the size of the decoded data."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import frozen
from engine.config import TrainConfig
from engine.data import load_dataset
from engine.errors import DataError
from engine.pipeline import score_methods
from engine.sources import MEMORY_BUDGET_VARIABLE, LazyImages, batches, inference_batch, memory_budget
from engine.stages import RowStream, StageStore, fetch_rows, fingerprint
from engine.task import FeatureTask, ImageTask

ROOT = Path(__file__).resolve().parent.parent


def photo_folder(root: Path, per_class: int = 12, size: int = 20) -> Path:
    """Three classes of coloured squares, a few of another size and one grayscale file among them."""
    rng = np.random.default_rng(0)
    for c, colour in enumerate(((200, 40, 40), (40, 200, 40), (40, 40, 200))):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            side = size + 6 if i == 3 else size
            pixels = np.clip(rng.normal(colour, 40, (side, side + (i % 2), 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            (image.convert("L") if (c, i) == (1, 5) else image).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def lazy(monkeypatch):
    """Every dataset over one byte of decoded images is read per batch."""
    monkeypatch.setenv(MEMORY_BUDGET_VARIABLE, "1")


def test_memory_budget_reads_units(monkeypatch):
    monkeypatch.setenv(MEMORY_BUDGET_VARIABLE, "512M")
    assert memory_budget() == 512 * 2**20
    monkeypatch.setenv(MEMORY_BUDGET_VARIABLE, "1.5G")
    assert memory_budget() == 3 * 2**29
    assert inference_batch((224, 224, 3)) == 64  # 1.5 GiB / (4 × 64 × 224²) B = 125 rows: the power of two below
    monkeypatch.setenv(MEMORY_BUDGET_VARIABLE, "lots")
    with pytest.raises(DataError, match="expected bytes"):
        memory_budget()


class FakeLibc:
    def __init__(self):
        self.trims = 0

    def malloc_trim(self, pad):
        self.trims += 1


def test_the_heap_guard_trims_only_past_a_sixteenth_of_the_budget_above_the_lowest_point(monkeypatch):
    from engine import sources

    monkeypatch.setenv(MEMORY_BUDGET_VARIABLE, "1600M")
    resident = iter(np.array([500, 450, 540, 551, 300, 400, 399, 123]) * 2**20)  # MB at each check (and after a trim)
    monkeypatch.setattr(sources, "_anonymous_resident", lambda: int(next(resident)))
    guard = sources.HeapGuard()
    guard.libc, guard.INTERVAL = FakeLibc(), 0.0
    trims = []
    for _ in range(5):
        guard()
        trims.append(guard.libc.trims)
    assert trims == [0, 0, 0, 1, 1]  # 540 < 450 + 100; 551 > 450 + 100: trimmed to 300; 400 = 300 + 100
    guard.INTERVAL, guard.next_check = 60.0, 0.0
    guard()  # reads 399
    guard()  # within the interval: not even read
    assert next(resident) == 123 * 2**20


def test_the_heap_guard_gives_back_a_fragmented_heap(monkeypatch):
    """Many blocks below glibc's mmap threshold, freed with one in a hundred kept: the heap holds the
    rest until trimmed (glibc and Linux only)."""
    from engine import sources

    monkeypatch.setenv(MEMORY_BUDGET_VARIABLE, "1600M")
    guard = sources.HeapGuard()
    if guard.libc is None or sources._anonymous_resident() is None:
        pytest.skip("glibc on Linux only")
    guard.INTERVAL = 0.0
    guard()
    blocks = [np.ones(100_000 // 8) for _ in range(4000)]  # 400 MB of 100 kB blocks, in the heap
    kept = blocks[::100]
    del blocks
    before = sources._anonymous_resident()
    guard()
    assert sources._anonymous_resident() < before - 200 * 2**20, (before, sources._anonymous_resident())
    del kept


def test_a_listing_reads_each_header_once_with_a_workspace_folder(tmp_path, monkeypatch):
    """A second load with the same workspace folder reads no header (it stats the files); a file changed
    since is read again, alone; a damaged cache is ignored; the cache lies in the workspace folder."""
    from engine import data as data_module

    folder = photo_folder(tmp_path / "photos")
    monkeypatch.setenv(MEMORY_BUDGET_VARIABLE, "1")
    read = []
    real = data_module.read_header
    monkeypatch.setattr(data_module, "read_header", lambda path: read.append(path.name) or real(path))
    first = load_dataset(folder, lazy=True, listings=tmp_path / "ws")
    assert len(read) == len(first)
    (cache,) = (tmp_path / "ws" / "listings").iterdir()
    read.clear()
    again = load_dataset(folder, lazy=True, listings=tmp_path / "ws")
    assert read == []
    assert (again.paths, again.index.tolist(), again.images.shape, again.notes) == \
        (first.paths, first.index.tolist(), first.images.shape, first.notes)
    np.testing.assert_array_equal(again.images[:], first.images[:])
    changed = folder / first.paths[4]
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))
    load_dataset(folder, lazy=True, listings=tmp_path / "ws")
    assert read == [changed.name]
    cache.write_bytes(b"not an npz")
    read.clear()
    assert load_dataset(folder, lazy=True, listings=tmp_path / "ws").paths == first.paths
    assert len(read) == len(first)
    assert not any(p.suffix == ".npz" for p in folder.rglob("*"))  # nothing written beside the data


@pytest.mark.parametrize("image_size", [None, 16])
def test_lazy_folder_reads_what_the_in_memory_loader_decodes(tmp_path, monkeypatch, image_size):
    folder = photo_folder(tmp_path / "photos")
    eager = load_dataset(folder, image_size=image_size)
    monkeypatch.setenv(MEMORY_BUDGET_VARIABLE, "1")
    listed = load_dataset(folder, image_size=image_size)
    assert isinstance(listed.images, LazyImages) and isinstance(eager.images, np.ndarray)
    assert listed.images.shape == eager.images.shape
    np.testing.assert_array_equal(listed.images[:], eager.images)
    np.testing.assert_array_equal(listed.images[[5, 2, 30]], eager.images[[5, 2, 30]])
    assert (listed.index.tolist(), listed.paths, listed.notes) == (eager.index.tolist(), eager.paths, eager.notes)
    part = listed.subset(np.arange(len(listed)) % 3 == 1)  # a view: nothing decoded until read
    assert isinstance(part.images, LazyImages)
    np.testing.assert_array_equal(part.images[:], eager.subset(np.arange(len(eager)) % 3 == 1).images)


def test_statistics_stream_over_batches_exactly(tmp_path, lazy):
    folder = photo_folder(tmp_path / "photos")
    listed = load_dataset(folder)
    pixels = listed.images[:].reshape(-1, 3).astype(np.float64) / 255.0  # the old way: every pixel at once
    task = ImageTask.fit(listed)
    np.testing.assert_allclose(task.mean, pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(task.std, pixels.std(0), rtol=1e-9)
    rows = np.random.default_rng(1).normal(3, 2, (1000, 7)).astype(np.float32)
    sample = load_dataset("sample")  # any labels: the rows are what counts
    from dataclasses import replace
    head = FeatureTask.fit(replace(sample.subset(np.arange(1000)), images=rows, holds_features=True))
    np.testing.assert_allclose(head.mean, rows.astype(np.float64).mean(0), rtol=1e-10)
    np.testing.assert_allclose(head.std, rows.astype(np.float64).std(0), rtol=1e-10)


@pytest.mark.slow
def test_scores_are_the_same_read_per_batch_or_in_memory(tmp_path, monkeypatch):
    folder = photo_folder(tmp_path / "photos")
    config = TrainConfig(epochs=3, batch_size=16, checkpoints=2)

    def scores():
        train = load_dataset(folder)
        validation = train.subset(np.arange(len(train)) % 4 == 0)
        run = score_methods(train.subset(np.arange(len(train)) % 4 != 0), ["loss", "vm-loss", "tracin-last"],
                            validation=validation, config=config)
        return train, {name: result.scores for name, result in run.results.items()}

    eager_data, eager = scores()
    monkeypatch.setenv(MEMORY_BUDGET_VARIABLE, "1")
    lazy_data, lazy_scores = scores()
    assert isinstance(lazy_data.images, LazyImages) and not isinstance(eager_data.images, LazyImages)
    for name in eager:  # inference batches differ in size (one row vs. all): float rounding only
        np.testing.assert_allclose(lazy_scores[name], eager[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_npz_larger_than_the_budget_is_memory_mapped(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 9, 9, 3), dtype=np.uint8)
    np.savez(tmp_path / "big.npz", images=images, labels=np.arange(50) % 2)  # uncompressed: mappable
    np.savez_compressed(tmp_path / "packed.npz", images=images, labels=np.arange(50) % 2)
    monkeypatch.setenv(MEMORY_BUDGET_VARIABLE, "1K")
    mapped = load_dataset(tmp_path / "big.npz")
    assert isinstance(mapped.images, LazyImages) and isinstance(mapped.images.source.array, np.memmap)
    np.testing.assert_array_equal(mapped.images[:], images)
    np.testing.assert_array_equal(mapped.subset([4, 1]).images[:], images[[4, 1]])
    np.testing.assert_array_equal(load_dataset(tmp_path / "big.npz", image_size=6).images[3].shape, (6, 6, 3))
    assert isinstance(load_dataset(tmp_path / "packed.npz").images, np.ndarray)  # compressed: loaded (it fits)
    monkeypatch.delenv(MEMORY_BUDGET_VARIABLE)
    loaded = load_dataset(tmp_path / "big.npz")
    np.testing.assert_array_equal(loaded.images, images)
    assert fingerprint(mapped) == fingerprint(loaded)  # the same rows: the same stages, mapped or loaded


def test_a_file_that_fails_in_a_worker_is_named_in_one_error(tmp_path, lazy):
    folder = photo_folder(tmp_path / "photos")
    broken = folder / "class_2" / "007.png"
    broken.write_bytes(broken.read_bytes()[:120])  # the header reads, the pixels do not
    listed = load_dataset(folder)
    with pytest.raises(DataError, match=r"007\.png: unreadable image"):
        for _ in batches(listed.images, batch_size=4, workers=2):
            pass


def test_workers_started_from_a_fork_server_read_the_same_rows(tmp_path, lazy, monkeypatch):
    """The dashboard's decoding workers do not fork its many-threaded server: the same rows, the same
    one-line error for a broken file."""
    from engine import sources

    monkeypatch.setattr(sources, "_worker_start", None)
    folder = photo_folder(tmp_path / "photos")
    listed = load_dataset(folder)
    forked = np.concatenate([b for _, b in batches(listed.images, batch_size=4, workers=2)])
    sources.start_workers_from_a_fork_server()
    assert sources._worker_start == "forkserver"
    served = np.concatenate([b for _, b in batches(listed.images, batch_size=4, workers=2)])
    np.testing.assert_array_equal(served, forked)
    broken = folder / "class_2" / "007.png"
    broken.write_bytes(broken.read_bytes()[:120])
    with pytest.raises(DataError, match=r"007\.png: unreadable image"):
        for _ in batches(load_dataset(folder).images, batch_size=4, workers=2):
            pass


@pytest.mark.parametrize("killed_at", [0, 1, 3])
def test_row_stage_resumes_at_the_first_missing_chunk(tmp_path, killed_at):
    rows = np.random.default_rng(0).normal(size=(45, 6)).astype(np.float32)
    asked = []

    class Killed(Exception):
        pass

    def compute(lo, hi, fail_at=None):
        if fail_at is not None and lo // 10 == fail_at:
            raise Killed
        asked.append(lo)
        return rows[lo:hi]

    store = StageStore(tmp_path / "stages")
    with pytest.raises(Killed):
        fetch_rows(store, "features", "k", 45, lambda lo, hi: compute(lo, hi, killed_at), chunk_rows=10,
                   dtype=np.float16)
    asked.clear()
    again = StageStore(tmp_path / "stages")
    out = fetch_rows(again, "features", "k", 45, compute, chunk_rows=10, dtype=np.float16)
    assert asked == list(range(10 * killed_at, 45, 10))  # only the chunks the killed run had not saved
    np.testing.assert_array_equal(out, rows.astype(np.float16))
    assert again.summary()["computed"] == [f"features ({killed_at} of 5 chunks resumed)" if killed_at else "features"]
    asked.clear()
    assert np.array_equal(fetch_rows(StageStore(tmp_path / "stages"), "features", "k", 45, compute, chunk_rows=10,
                                     dtype=np.float16), out) and asked == []


def test_a_row_stream_feeds_chunks_from_one_pass_and_starts_again_after_a_gap():
    rows = np.arange(23 * 2).reshape(23, 2)
    passes = []

    def batches_from(lo):
        passes.append(lo)
        return ((np.arange(b, min(b + 3, 23)), rows[b:b + 3]) for b in range(lo, 23, 3))  # batches of 3, chunks of 4

    stream = RowStream(batches_from)
    got = {lo: stream(lo, min(lo + 4, 23)) for lo in (0, 4, 8, 16, 20)}  # chunk 12 saved by a killed run
    assert passes == [0, 16]
    for lo, part in got.items():
        np.testing.assert_array_equal(part, rows[lo:lo + 4])


def test_feature_chunks_from_one_pass_equal_a_pass_per_chunk(tmp_path, monkeypatch):
    folder = photo_folder(tmp_path / "photos", per_class=20)
    backbone = pooling_backbone(tmp_path / "pool.pt")
    monkeypatch.setattr(frozen, "FEATURE_CHUNK_ROWS", 16)
    monkeypatch.setenv(MEMORY_BUDGET_VARIABLE, "450K")  # inference batches of 4 rows
    photos = load_dataset(folder, lazy=True)
    assert inference_batch(photos.image_shape, cap=256) == 4
    config = TrainConfig(backbone=str(backbone), device="cpu")
    _, features, _ = frozen.frozen_inputs(config, photos, stages=StageStore(tmp_path / "stages"))
    extractor = frozen.FrozenBackbone(config, photos, torch.device("cpu"))
    per_chunk = np.concatenate([extractor.features(photos.subset(np.arange(lo, min(lo + 16, len(photos)))))
                                for lo in range(0, len(photos), 16)])
    np.testing.assert_array_equal(features.images[:], per_chunk.astype(frozen.FEATURE_DTYPE))


def pooling_backbone(path: Path) -> Path:
    """A TorchScript feature extractor: each channel averaged over a 4×4 grid (cheap at any image size)."""

    class Pool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    torch.jit.save(torch.jit.script(Pool()), str(path))
    return path


def big_photo_folder(root: Path, count: int, side: int) -> Path:
    """``count`` smooth photos of side² RGB pixels: tiny PNGs, large once decoded."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    for i in range(count):
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        tint = (i * 37) % 200
        pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.full((side, side), tint), ramp[None].repeat(side, 0)], 2)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:04d}.png", compress_level=1)
    return root


def _score_peak(folder: Path, backbone: Path, out: Path) -> int:
    """The main process's peak RSS (bytes) of a CLI run through the backbone with a 256 MB budget: its
    VmHWM, which starts again at exec (``ru_maxrss`` would keep the forked copy of the test process)."""
    env = {**os.environ, MEMORY_BUDGET_VARIABLE: "256M", "PYTHONPATH": str(ROOT)}
    code = ("import sys\nfrom engine.cli import main\nstatus = main(sys.argv[1:])\n"
            "peak = next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1]\n"
            "print('PEAK', int(peak) * 1024)\nsys.exit(status)")
    done = subprocess.run([sys.executable, "-c", code, "score", str(folder), "--method", "vm-loss",
                           "--val-from-train", "0.2", "--backbone", str(backbone), "--epochs", "3", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    scored = json.loads(done.stdout.split("PEAK")[0].strip().splitlines()[-1])["n"]
    assert scored == len(list(folder.rglob("*.png"))) * 4 // 5  # every photo but the carved fifth
    return int(done.stdout.split("PEAK")[1])


@pytest.mark.slow
def test_a_run_takes_less_memory_than_its_decoded_images(tmp_path):
    """60 and 300 photos of 1024² RGB are 0.19 and 0.94 GB decoded; scored through a frozen backbone with a
    256 MB budget, the larger run's peak is below its decoded size and barely above the smaller run's
    (the old loader held every image, and more)."""
    backbone = pooling_backbone(tmp_path / "pool.pt")
    small = _score_peak(big_photo_folder(tmp_path / "small", 60, 1024), backbone, tmp_path / "small.csv")
    large = _score_peak(big_photo_folder(tmp_path / "large", 300, 1024), backbone, tmp_path / "large.csv")
    decoded = 300 * 1024 * 1024 * 3
    assert large < decoded, (small, large)
    assert large - small < 0.25 * (decoded - 60 * 1024 * 1024 * 3), (small, large)


KILL_SCRIPT = """
import sys, time
import torch
from engine import frozen, stages
from engine.cli import main

frozen.FEATURE_CHUNK_ROWS = 16
original = stages.RowStream.__call__
def slow(self, lo, hi):
    time.sleep(float(sys.argv[1]))
    return original(self, lo, hi)
stages.RowStream.__call__ = slow
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_kill_minus_nine_during_feature_extraction_resumes_to_the_same_scores(tmp_path):
    folder = photo_folder(tmp_path / "photos", per_class=30)  # 90 photos: 6 chunks of 16
    backbone = pooling_backbone(tmp_path / "pool.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT), MEMORY_BUDGET_VARIABLE: "1"}

    def score(workspace: Path, out: str, delay: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(delay), "score", str(folder), "--method",
                                 "vm-loss", "--val-from-train", "0.2", "--backbone", str(backbone), "--epochs", "3",
                                 "--workspace", str(workspace), "--out", str(tmp_path / out)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    reference = score(tmp_path / "clean", "clean.csv", 0.0)
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]
    victim = score(tmp_path / "killed", "killed.csv", 1.0)
    record = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        saved = list((tmp_path / "killed" / "stages").glob("features-*.chunk-*"))
        if len(saved) >= 2:
            record = saved[0]
            break
        time.sleep(0.05)
    assert record is not None, "the run never saved two chunks"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = score(tmp_path / "killed", "killed.csv", 0.0)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]
    report = json.loads(resumed.stdout.read().strip().splitlines()[-1])
    assert any("chunks resumed" in label for label in report["workspace"]["stages"]["computed"])
    assert (tmp_path / "killed.csv").read_text() == (tmp_path / "clean.csv").read_text()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _torchrun_score(folder: Path, backbone: Path, workspace: Path, out: Path, delay: float) -> subprocess.Popen:
    """Two ranks (gloo) score the photos through the backbone in one workspace, each feature chunk
    ``delay`` seconds slower (so a kill lands between chunks)."""
    script = workspace.parent / "rank.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), MEMORY_BUDGET_VARIABLE: "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(delay), "score", str(folder), "--method", "vm-loss", "--val-from-train",
                             "0.2", "--backbone", str(backbone), "--epochs", "3", "--threads", "1", "--workspace",
                             str(workspace), "--out", str(out), "--distributed"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
def test_two_ranks_resume_after_kill_minus_nine_and_agree_with_one_process(tmp_path):
    from scipy.stats import spearmanr

    folder = photo_folder(tmp_path / "photos", per_class=30)  # 72 training photos: 5 chunks of 16, 2 ranks
    backbone = pooling_backbone(tmp_path / "pool.pt")
    (tmp_path / "clean").mkdir(), (tmp_path / "killed").mkdir()
    reference = _torchrun_score(folder, backbone, tmp_path / "clean", tmp_path / "clean.csv", 0.0)
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    victim = _torchrun_score(folder, backbone, tmp_path / "killed", tmp_path / "killed.csv", 1.0)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        if list((tmp_path / "killed" / "stages").glob("features-*.chunk-*")):
            break
        time.sleep(0.02)
    assert victim.poll() is None, victim.stderr.read()[-3000:]  # killed while its features are half written
    ranks = _descendants(victim.pid)  # torchrun starts its ranks in sessions of their own
    for pid in [victim.pid, *ranks]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed.csv").exists()
    resumed = _torchrun_score(folder, backbone, tmp_path / "killed", tmp_path / "killed.csv", 0.0)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    report = json.loads(resumed.stdout.read().strip().splitlines()[-1])
    assert any("chunks resumed" in label for label in report["workspace"]["stages"]["computed"]), report["workspace"]
    assert (tmp_path / "killed.csv").read_text() == (tmp_path / "clean.csv").read_text()
    env = {**os.environ, "PYTHONPATH": str(ROOT), MEMORY_BUDGET_VARIABLE: "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "engine.cli", "score", str(folder), "--method", "vm-loss",
                             "--val-from-train", "0.2", "--backbone", str(backbone), "--epochs", "3", "--threads",
                             "1", "--out", str(tmp_path / "one.csv")], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    import pandas as pd

    ranks, one = (pd.read_csv(tmp_path / name).set_index("index").sort_index() for name in ("clean.csv", "one.csv"))
    assert spearmanr(ranks["score"], one["score"]).statistic >= 0.99


def test_a_photo_becomes_a_jpeg_thumbnail_and_a_small_image_a_png(tmp_path):
    """A photo shrunk to a card is a JPEG (a fortieth of a PNG's time, a fifth of its bytes); an image no
    larger than a card stays a lossless PNG, its pixels as they are."""
    from engine import thumbnails
    from engine.data import load_dataset

    folder = photo_folder(tmp_path / "photos", per_class=2)
    Image.fromarray(np.full((300, 400, 3), 90, dtype=np.uint8)).save(folder / "class_0" / "big.jpg")
    dataset = load_dataset(folder, image_size=20)
    big, small = list(dataset.paths).index("class_0/big.jpg"), list(dataset.paths).index("class_0/000.png")
    photo, pixels = thumbnails.encode(dataset, big), thumbnails.encode(dataset, small)
    assert thumbnails.media_type(photo) == "image/jpeg" and thumbnails.media_type(pixels) == "image/png"
    assert Image.open(io.BytesIO(photo)).size == (thumbnails.THUMBNAIL_PX, 84)
    with Image.open(folder / "class_0" / "000.png") as original, Image.open(io.BytesIO(pixels)) as thumbnail:
        np.testing.assert_array_equal(np.asarray(thumbnail), np.asarray(original))


def test_the_gallery_reads_stored_thumbnails_of_its_page_only(tmp_path, monkeypatch, lazy):
    """Scoring stores the thumbnails of the ranking's top rows; a page reads those back without opening a
    file, and a page further down makes its own from the row's file once and stores them."""
    from engine import thumbnails
    from engine.runs import RunSettings, load_run_data, score_into
    from engine.workspace import Workspace

    monkeypatch.setattr(thumbnails, "STAGE_ROWS", 5)
    settings = RunSettings(data=str(photo_folder(tmp_path / "photos")), epochs=1)
    data = load_run_data(settings)
    workspace = Workspace(tmp_path / "ws.sqlite")
    key, _ = score_into(workspace, settings, data, ["loss"], stages=StageStore(tmp_path / "stages"))
    top = np.argsort(-workspace.results(key)["loss"].scores, kind="stable")[:5]
    stored = workspace.thumbnails(key, data.train.index.tolist(), thumbnails.THUMBNAIL_PX)
    assert sorted(stored) == sorted(data.train.index[top].tolist())

    opened = []
    real = thumbnails.original_image
    monkeypatch.setattr(thumbnails, "original_image", lambda d, p, s: opened.append(p) or real(d, p, s))
    assert thumbnails.thumbnails(workspace, key, data.train, top) == [stored[i] for i in data.train.index[top]]
    assert opened == []
    further = np.setdiff1d(np.arange(len(data.train)), top)[:3]
    pngs = thumbnails.thumbnails(workspace, key, data.train, further)
    assert opened == further.tolist()
    with Image.open(tmp_path / "photos" / data.train.paths[further[0]]) as photo:  # under 112 px: as it is
        assert Image.open(io.BytesIO(pngs[0])).size == photo.size
    thumbnails.thumbnails(workspace, key, data.train, further)
    assert opened == further.tolist()  # stored the first time
