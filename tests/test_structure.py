"""The code's shape says what is true: modules depend on each other one way, names say what they hold,
and no module reaches into another's private names."""

from __future__ import annotations

import ast
import dataclasses
import graphlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_dataset

from engine.config import TrainConfig
from engine.data import Dataset
from engine.errors import DataError
from engine.progress import no_progress
from engine.stages import StageStore, train_in_stages, training_key
from engine.task import FeatureTask, ImageTask, Task, fit_task
from engine.training import Checkpoint

REPO = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _loaded_statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements that run when the module is imported: its top level, inside ``if`` (``TYPE_CHECKING``
    too: a type-only import still ties two modules together), ``try`` and class bodies; not function bodies."""
    for statement in body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield statement
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from _loaded_statements(getattr(statement, field, []))


def _imported(node: ast.stmt, modules: set[str]) -> set[str]:
    """The modules among ``modules`` that an import statement names (``from engine.scorers import loss``
    names the submodule ``engine.scorers.loss``)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names} & modules
    if isinstance(node, ast.ImportFrom) and node.module:
        return {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                for alias in node.names} & modules
    return set()


def _import_graph(*packages: str) -> dict[str, set[str]]:
    files = {_module_name(path): path for package in packages for path in (REPO / package).rglob("*.py")}
    modules = set(files)
    return {name: {imported for statement in _loaded_statements(ast.parse(path.read_text()).body)
                   for imported in _imported(statement, modules)} - {name}
            for name, path in files.items()}


def test_engine_modules_import_each_other_one_way():
    """No cycle among the imports that run when a module loads: the recipe (config), the start network,
    the trainer, the stage store and the feature stage each depend only on the ones before them."""
    graph = _import_graph("engine", "sample_data")
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"engine modules import each other in a cycle: {' -> '.join(exc.args[1])}")
    assert "engine.config" in graph["engine.start"] and "engine.start" in graph["engine.training"]
    assert {"engine.stages", "engine.start"} <= graph["engine.frozen"]


def test_the_sample_data_imports_nothing_from_the_engine():
    """The engine builds the sample Dataset from the arrays sample_data gives (not even a lazy import
    back, which would hide the cycle inside a function)."""
    for path in (REPO / "sample_data").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(name.split(".")[0] == "engine" for name in names), f"{path.name}:{node.lineno}"


def test_image_and_feature_tasks_are_siblings_chosen_by_what_the_rows_are():
    assert not issubclass(FeatureTask, ImageTask) and not issubclass(ImageTask, FeatureTask)
    assert issubclass(FeatureTask, Task) and issubclass(ImageTask, Task)
    rows = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    features = Dataset(rows, np.arange(6) % 2, ("a", "b"), holds_features=True)
    assert type(fit_task(features)) is FeatureTask
    assert type(fit_task(make_dataset())) is ImageTask


def test_a_dataset_says_when_it_holds_feature_rows_and_is_held_to_it():
    rows = np.zeros((6, 4), np.float32)
    with pytest.raises(DataError, match="images must be a uint8 array"):
        Dataset(rows, np.arange(6) % 2, ("a", "b"))  # feature rows are not taken for images unasked
    with pytest.raises(DataError, match="feature rows must be an N×D float16 or float32 array"):
        Dataset(make_dataset().images, make_dataset().labels, ("a", "b", "c"), holds_features=True)
    features = Dataset(rows, np.arange(6) % 2, ("a", "b"), holds_features=True)
    assert features.subset(np.arange(3)).holds_features and features.with_labels(np.ones(6)).holds_features


def test_a_checkpoint_names_its_mean_rate_and_stored_stages_keep_their_format(tmp_path):
    """``mean_learning_rate`` (the mean over the steps a checkpoint stands for); stage files keep the
    stored key ``learning_rate``, so a file written before the rename reads the same."""
    assert [f.name for f in dataclasses.fields(Checkpoint)] == ["epoch", "mean_learning_rate", "state", "steps"]
    data, config = make_dataset(), TrainConfig(epochs=2, checkpoints=2, threads=1)
    trained = train_in_stages(data, config, StageStore(tmp_path), progress=no_progress)
    stored = torch.load(StageStore(tmp_path).path("train", training_key(data, config)), weights_only=True)
    assert [sorted(c) for c in stored["checkpoints"]] == [["epoch", "learning_rate", "state", "steps"]] * 2
    again = StageStore(tmp_path)
    reloaded = train_in_stages(data, config, again, progress=no_progress)
    assert again.log == [("train", "reused")]
    assert [(c.epoch, c.mean_learning_rate, c.steps) for c in reloaded.checkpoints] == \
        [(c.epoch, c.mean_learning_rate, c.steps) for c in trained.checkpoints]


def test_no_benchmark_imports_another_scripts_private_names():
    """Helpers two scripts share live in benchmarks/common.py under public names."""
    for path in (REPO / "benchmarks").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"


def test_no_engine_or_dashboard_code_sets_another_objects_private_attribute():
    """An object's private state is changed through its own methods (e.g. ScoringContext.share_predictions)."""
    for path in [*(REPO / "engine").rglob("*.py"), *(REPO / "dashboard").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in (sub for t in targets for sub in ast.walk(t)):
                if isinstance(target, ast.Attribute) and target.attr.startswith("_") and \
                        not target.attr.startswith("__") and \
                        not (isinstance(target.value, ast.Name) and target.value.id in ("self", "cls")):
                    pytest.fail(f"{path.relative_to(REPO)}:{node.lineno} sets {ast.unparse(target)}")


def test_every_benchmark_script_imports():
    """A script that names an engine function removed since (flagship_variants.py imported fit_last_layer
    long after it was gone) fails here, not on the day someone reruns it. One process: imports only."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    names = sorted(p.stem for p in (root / "benchmarks").glob("*.py") if p.stem != "__init__")
    code = f"import importlib\nfor name in {names!r}:\n    importlib.import_module('benchmarks.' + name)\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
