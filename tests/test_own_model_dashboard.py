"""The set-up page's "Bring your model" fields reach the run: a head trained on frozen features."""

from __future__ import annotations

import torch
from test_dashboard_app import finish_jobs, new_session, workspace_file

from engine.data import load_sample
from engine.models import build_model
from engine.workspace import Workspace


def test_setup_page_starts_from_a_weights_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sample = load_sample()
    torch.save(build_model("small-cnn", sample.image_shape, 10, torch.device("cpu")).state_dict(), tmp_path / "w.pt")
    at = new_session()
    at.multiselect(key="setup_methods").set_value(["loss", "if-last"])
    at.text_input(key="setup_weights").set_value(str(tmp_path / "w.pt"))
    at.selectbox(key="setup_freeze").set_value("backbone")
    at.number_input(key="setup_epochs_fast-cpu").set_value(2)
    at.button(key="run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    finish_jobs()
    at.run()
    assert not at.exception, at.exception
    workspace = Workspace(workspace_file(tmp_path))
    (key,) = workspace.runs()["config_hash"]
    assert workspace.runs()["settings"][0]["weights"] == str(tmp_path / "w.pt")
    report = workspace.report(key, "training")
    assert report["model"] == "linear"
    assert "head alone" in workspace.results(key)["if-last"].info["trained_part"]
