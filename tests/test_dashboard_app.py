"""The dashboard through Streamlit's AppTest, on the sample data with injected noise.

One fast scoring run (loss, 2 epochs) goes through the set-up page; the other tests open fresh
sessions on the same workspace folder, which is also what a browser refresh does.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, make_dataset, save_image, write_image_folder
from streamlit.components.v2.bidi_component.main import _make_trigger_id
from streamlit.proto.WidgetStates_pb2 import WidgetState
from streamlit.testing.v1 import AppTest

from engine.errors import InfluenceLensError
from engine.guidance import review_estimate
from engine.measured import measured_methods, recommended_methods
from engine.metrics import detection_metrics, ranks
from engine.runs import RunSettings, load_run_data
from engine.scorers import ScoreResult, available_methods, scorer_class
from engine.workspace import Workspace

APP = str(REPO_ROOT / "dashboard" / "app.py")
NOISE, KIND = 0.1, "symmetric"


def finish_jobs() -> None:
    """Wait for the background jobs (scoring, retraining) the session started."""
    from dashboard import jobs

    for job in jobs.REGISTRY.jobs():
        job.wait(timeout=300)
        assert not job.running, f"{job.label} did not finish"


def new_session(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120).run()
    if page is not None:
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def _elements(node):
    yield node
    for child in getattr(node, "children", {}).values():
        yield from _elements(child)


def _gallery_element(at: AppTest):
    (element,) = [e for e in _elements(at._tree) if getattr(e, "type", None) == "bidi_component"
                  and e.proto.component_name == "influence_lens.gallery"]
    return element


def gallery_data(at: AppTest) -> dict:
    """What the gallery component was given on the last run (its cards, acknowledgements, failures)."""
    return json.loads(_gallery_element(at).proto.json)


def cards(at: AppTest) -> list[dict]:
    return gallery_data(at)["cards"]


def card_indices(at: AppTest, *, acceptable: bool = False) -> list[int]:
    return [c["i"] for c in cards(at) if not acceptable or c["s"] != c["g"]]


SEQ = itertools.count(1)  # the browser numbers its commands; one tab ("test") across this module's workspace


def send(at: AppTest, *commands: dict, client: str = "test", seqs: list[int] | None = None) -> AppTest:
    """What the gallery's browser code sends: one trigger value with a batch of numbered commands
    (``seqs`` to resend given numbers). AppTest has no interaction for a v2 component, so the trigger
    is put into the widget states of the next run, as the browser's message would."""
    items = [{"seq": next(SEQ) if seqs is None else seqs[n], **c} for n, c in enumerate(commands)]
    states = at._tree.get_widget_states()
    payload = {"client": client, "run": gallery_data(at)["run"], "items": items}
    states.widgets.append(WidgetState(id=_make_trigger_id(_gallery_element(at).proto.id, "events"),
                                      json_trigger_value=json.dumps([{"event": "batch", "value": payload}])))
    at._run(states)
    assert not at.exception, at.exception
    return at


def status_of(at: AppTest, index: int) -> str:
    return next(c["st"] for c in cards(at) if c["i"] == index)


def workspace_file(folder: Path) -> Path:
    (path,) = (folder / "workspaces").glob("*.sqlite")
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder whose ``workspaces/`` holds one scored run, made through the set-up page."""
    root = tmp_path_factory.mktemp("dashboard")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        at = new_session()
        at.multiselect(key="setup_methods").set_value(["loss"])
        at.toggle(key="setup_demo").set_value(True).run()
        at.slider(key="setup_rate").set_value(NOISE)
        at.selectbox(key="setup_kind").set_value(KIND)
        at.number_input(key="setup_epochs_fast-cpu").set_value(2)
        at.button(key="run").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        finish_jobs()
        at.run()  # the job is done: the page switches to the gallery
        assert not at.exception, at.exception
        assert [t.value for t in at.title] == ["Review the suspects"]
        assert len(cards(at)) == 24  # one page of cards
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def session_dir(folder, monkeypatch):
    monkeypatch.chdir(folder)
    return folder


def test_setup_page_lists_the_registry(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    at = new_session()
    options = at.multiselect(key="setup_methods").options
    expected = [f"{m} ✱" if scorer_class(m).requires_validation else m for m in available_methods()]
    assert options == expected
    assert any("Device" in m.value for m in at.markdown)


def test_setup_defaults_are_the_best_measured_methods_of_the_committed_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    at = new_session()  # the sample data comes with its trusted validation set: every method can run
    assert at.multiselect(key="setup_methods").value == recommended_methods(available_methods(), 3)
    assert at.multiselect(key="setup_methods").value[0] == measured_methods()[0].method
    # Chosen by the table, not by name: another table, other defaults.
    table = {"methods": [{"method": m, "mean_auroc": a, "auroc": {"x": a}}
                         for m, a in (("tracin", 0.9), ("margin", 0.8), ("if-last", 0.7), ("fvm", 0.1))]}
    (tmp_path / "measured.json").write_text(json.dumps(table))
    monkeypatch.setattr("engine.measured.MEASURED_FILE", tmp_path / "measured.json")
    assert new_session().multiselect(key="setup_methods").value == ["tracin", "margin", "if-last"]


def test_a_method_needing_validation_is_refused_without_one(tmp_path, monkeypatch):
    needing = [m for m in available_methods() if scorer_class(m).requires_validation]
    if not needing:
        pytest.skip("no registered method needs a validation set")
    monkeypatch.chdir(tmp_path)
    at = new_session()
    at.radio(key="setup_val_mode").set_value("none")
    at.multiselect(key="setup_methods").set_value([needing[0]])
    at.button(key="run").click().run()
    assert any("need a validation set" in e.value for e in at.error)
    assert not (tmp_path / "workspaces").exists() or not list((tmp_path / "workspaces").glob("*.sqlite"))


def test_relabel_reaches_the_sqlite_file_and_undo_restores(session_dir):
    path = workspace_file(session_dir)
    at = new_session("views/review.py")  # a fresh session finds the run: as after a browser refresh
    card = next(c for c in cards(at) if c["s"] != c["g"])
    send(at, {"action": "relabel", "index": card["i"], "label": card["s"]})
    decisions = Workspace(path).decisions()
    assert decisions[["index", "action", "new_label"]].values.tolist() == [[card["i"], "relabel", card["s"]]]
    assert status_of(at, card["i"]) == "relabel"
    assert gallery_data(at)["acks"]["test"] == next(SEQ) - 1  # acknowledged: the card may say "saved"
    again = new_session("views/review.py")  # a refresh, or a second tab: the decision is shown
    assert status_of(again, card["i"]) == "relabel"
    again.button(key="undo").click().run()  # undo in the second tab
    assert Workspace(path).decisions().empty
    assert Workspace(path).decision_log()["action"].tolist() == ["relabel", "undo"]
    at.run()  # the first tab sees it on its next rerun
    assert status_of(at, card["i"]) == "unreviewed"


def test_gallery_commands_are_applied_once_and_in_order_even_when_resent(session_dir):
    """Issue 17: keys typed fast were lost. The browser resends every command not yet acknowledged, in one
    batch: each is applied once, in the order typed, also by a fresh session (a reload or a restarted
    server) that only has the numbers stored in SQLite."""
    path = workspace_file(session_dir)
    at = new_session("views/review.py")
    first, second, third = card_indices(at)[:3]
    before = len(Workspace(path).decision_log())
    commands = [{"action": "keep", "index": first}, {"action": "drop", "index": second},
                {"action": "relabel", "index": first, "label": 3}]
    seqs = [next(SEQ) for _ in commands]
    send(at, *commands[:2], seqs=seqs[:2])
    send(at, *commands, seqs=seqs)  # the first two again, with the third: a batch sent while one was in flight
    log = Workspace(path).decision_log()[before:]
    assert log[["index", "action"]].values.tolist() == [[first, "keep"], [second, "drop"], [first, "relabel"]]
    assert gallery_data(at)["acks"]["test"] == seqs[-1]
    fresh = new_session("views/review.py")  # a server restart: the session knows nothing, SQLite does
    send(fresh, *commands, {"action": "keep", "index": third}, seqs=[*seqs, next(SEQ)])
    log = Workspace(path).decision_log()[before:]
    assert log[["index", "action"]].values.tolist()[3:] == [[third, "keep"]]
    for _ in range(4):
        fresh.button(key="undo").click().run()
    assert Workspace(path).decisions().empty


def test_a_failed_write_is_reported_for_its_card_and_applied_when_resent(session_dir, monkeypatch):
    """A write that fails is named (with its number) for the browser, which shows it on the card and
    resends it; the later commands wait behind it, so the order holds."""
    path = workspace_file(session_dir)
    at = new_session("views/review.py")
    first, second = card_indices(at)[:2]
    before = len(Workspace(path).decision_log())
    real = Workspace.decide

    def locked(self, *args, **kwargs):
        raise InfluenceLensError(f"{self.path}: the workspace stayed locked by another process; try again")

    monkeypatch.setattr(Workspace, "decide", locked)
    commands, seqs = [{"action": "keep", "index": first}, {"action": "drop", "index": second}], [next(SEQ), next(SEQ)]
    send(at, *commands, seqs=seqs)
    data = gallery_data(at)
    assert data["errors"]["test"]["seq"] == seqs[0] and "locked" in data["errors"]["test"]["message"]
    assert data["acks"]["test"] < seqs[0] and Workspace(path).decisions().empty
    assert status_of(at, first) == "unreviewed"  # the server's truth: not written
    monkeypatch.setattr(Workspace, "decide", real)
    send(at, *commands, seqs=seqs)  # the browser's retry
    data = gallery_data(at)
    assert "test" not in data["errors"] and data["acks"]["test"] == seqs[1]
    log = Workspace(path).decision_log()[before:]
    assert log[["index", "action"]].values.tolist() == [[first, "keep"], [second, "drop"]]
    for _ in range(2):
        at.button(key="undo").click().run()


def test_a_review_decision_logs_its_server_time_at_debug_level_only(session_dir, caplog):
    """benchmarks/click_latency.py reads these lines: the callback, then the gallery's rerun after it."""
    from dashboard import timing

    timing.log.addHandler(caplog.handler)  # Streamlit's loggers do not propagate to the root logger
    level = timing.log.level
    try:
        at = new_session("views/review.py")
        caplog.clear()
        first, second = card_indices(at)[:2]
        send(at, {"action": "keep", "index": first})
        assert caplog.messages == []  # Streamlit's default level (info) prints nothing
        timing.log.setLevel("DEBUG")
        send(at, {"action": "drop", "index": second})
        steps = [m.split(" took ")[0] for m in caplog.messages]
        assert steps[:2] == ["decide", "gallery fragment"], caplog.messages
        assert all(float(m.split(" took ")[1].removesuffix(" ms")) > 0 for m in caplog.messages)
    finally:
        timing.log.setLevel(level)
        timing.log.removeHandler(caplog.handler)
    at.button(key="undo").click().run()
    at.button(key="undo").click().run()
    assert Workspace(workspace_file(session_dir)).decisions().empty


def test_bulk_action_on_selected_samples_is_one_batch(session_dir):
    path = workspace_file(session_dir)
    at = new_session("views/review.py")
    chosen = sorted(card_indices(at)[:3])
    send(at, *({"action": "select", "index": i, "on": True} for i in chosen))
    assert [c["i"] for c in cards(at) if c["sel"]] == [c["i"] for c in cards(at) if c["i"] in chosen]
    at.button(key="bulk_drop").click().run()
    current = Workspace(path).decisions()
    assert sorted(current["index"]) == chosen and set(current["action"]) == {"drop"}
    at.button(key="undo").click().run()  # one undo takes the whole batch back
    assert Workspace(path).decisions().empty


def test_review_depth_estimate_follows_the_decisions(session_dir):
    path = workspace_file(session_dir)
    workspace = Workspace(path)
    key = workspace.runs()["config_hash"][0]
    data = load_run_data(RunSettings(noise_rate=NOISE, noise_kind=KIND, epochs=2))
    logits = workspace.arrays(key)["logits"].astype(np.float64)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    expected = review_estimate(workspace.results(key), "loss", data.train.labels, probabilities)

    at = new_session("views/review.py")
    assert at.expander[0].label.startswith(f"How deep to review: down to **#{expected.stop_depth:,}**")
    at.session_state["review_panel_depth"] = True  # opened
    at.run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Review down to"] == f"{expected.stop_depth:,}"
    assert metrics["Found so far / estimated total"] == f"0 / {expected.expected_total:,.0f}"
    at.button(key="flag_down_to").click().run()
    assert at.number_input(key="review_cut").value == max(1, expected.stop_depth)

    top = int(data.train.index[expected.order[0]])
    send(at, {"action": "drop", "index": top})  # a confirmed error at the top of the ranking
    at.run()  # the estimate is drawn outside the gallery: it follows on the next full run
    assert {m.label: m.value for m in at.metric}["Found so far / estimated total"].startswith("1 / ")
    at.button(key="undo").click().run()
    at.session_state["review_panel_depth"] = False
    at.run()
    assert Workspace(path).decisions().empty


def test_spot_check_shows_random_samples_beyond_the_line(session_dir):
    workspace = Workspace(workspace_file(session_dir))
    key = workspace.runs()["config_hash"][0]
    scores = workspace.results(key)["loss"].scores
    data = load_run_data(RunSettings(noise_rate=NOISE, noise_kind=KIND, epochs=2))
    rank_of = dict(zip(data.train.index.tolist(), ranks(scores).tolist(), strict=True))
    at = new_session("views/review.py")
    at.session_state["review_panel_depth"] = True
    at.run()
    stop = int(at.metric[0].value.replace(",", ""))  # "Review down to"
    at.button(key="spot_check").click().run()
    shown = card_indices(at)
    assert len(shown) == 12 and all(rank_of[i] > stop for i in shown)
    at.button(key="end_spot_check").click().run()
    shown = card_indices(at)
    assert sorted(rank_of[i] for i in shown) == list(range(1, 25))  # the top of the ranking again
    at.session_state["review_panel_depth"] = False
    at.run()


def test_review_page_warns_about_an_unconverged_model(session_dir):
    at = new_session("views/review.py")  # the run trained for 2 epochs only
    assert any("may not have converged" in w.value for w in at.warning)


def test_every_page_renders(session_dir):
    at = new_session()
    for page in ("views/setup.py", "views/review.py", "views/detail.py", "views/recovery.py", "views/compare.py",
                 "views/loop.py", "views/export.py"):
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
        assert not at.error, (page, [e.value for e in at.error])


def test_compare_page_shows_the_methods_aurocs(session_dir):
    at = new_session("views/compare.py")
    table = at.dataframe[0].value
    data = load_run_data(RunSettings(noise_rate=NOISE, noise_kind=KIND, epochs=2))
    (path,) = [workspace_file(session_dir)]
    workspace = Workspace(path)
    key = workspace.runs()["config_hash"][0]
    scores = workspace.results(key)["loss"].scores
    assert table["method"].tolist() == ["loss"]
    assert table["AUROC"][0] == pytest.approx(detection_metrics(scores, data.flipped)["auroc"])


def test_detail_page_explains_with_neighbours(session_dir):
    at = new_session("views/detail.py")
    # finding 13: a suggestion that is not the most likely class said nowhere where it came from
    assert any(c.value.startswith("Predicted: the trained model θ*'s most likely class") and
               f"Suggested by **loss**: {scorer_class('loss').suggestion}." in c.value for c in at.caption)
    assert at.dataframe[0].value["method"].tolist() == ["loss"]
    assert any("Validation images most like it" in m.value for m in at.markdown)
    assert len(at.get("image")) == 1 + 3 * 6  # the sample, 6 validation and 2 × 6 training neighbours


def test_retrain_reports_accuracy_after(session_dir):
    path = workspace_file(session_dir)
    at = new_session("views/review.py")
    card = next(c for c in cards(at) if c["s"] != c["g"])
    send(at, {"action": "relabel", "index": card["i"], "label": card["s"]})
    at.switch_page("views/recovery.py").run()
    # finding 11: the cleaning curve (833 s on the sample) says its time before its button is pressed
    assert any(m.value.startswith("Estimated time on this device: **≈") and "one per point and ranking" in m.value
               for m in at.markdown)
    at.button(key="retrain").click().run()
    finish_jobs()
    at.run()
    assert not at.exception, at.exception
    after = next(m for m in at.metric if m.label == "Test accuracy after")
    assert after.value.endswith("%")
    report = Workspace(path).report(Workspace(path).runs()["config_hash"][0], "retrain")
    assert report["n_relabeled"] == 1 and len(report["class_accuracy_after"]) == 10
    assert np.isclose(float(after.value.rstrip("%")) / 100, report["test_accuracy_after"], atol=5e-4)
    at.button(key="undo").click().run()


def test_export_page_offers_the_three_csvs(session_dir):
    at = new_session("views/export.py")
    assert not at.exception
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels == ["Cleaned labels (CSV)", "Decision log (CSV)", "Decisions for `influence-lens retrain`"]


def test_a_finished_scoring_is_said_once_and_never_beside_a_failed_run(session_dir):
    from dashboard import jobs

    at = new_session()
    path, key, _ = at.session_state["active"]
    job_key = jobs.key_for("score", Path(path), key)
    jobs.start(job_key, "Scoring", lambda progress: None).wait()
    at.text_input(key="setup_data").set_value(str(session_dir / "missing"))
    at.button(key="run").click().run()  # issue 12: the error came beside the previous run's green "Scored …"
    assert any("no such file or folder" in e.value for e in at.error)
    assert not at.success
    jobs.start(job_key, "Scoring", lambda progress: None).wait()
    again = new_session()
    assert [s.value for s in again.success] == ["Scored loss in 0.0 s."]
    again.run()
    assert not again.success and jobs.get(job_key) is None


# -- the review workbench (issue 12) --------------------------------------------------------------

def suggestion_of(path: Path) -> dict[int, int]:
    workspace = Workspace(path)
    result = workspace.results(workspace.runs()["config_hash"][0])["loss"]
    data = load_run_data(RunSettings(noise_rate=NOISE, noise_kind=KIND, epochs=2))
    return dict(zip(data.train.index.tolist(), result.suggested_labels.tolist(), strict=True))


def test_bulk_accept_of_different_suggestions_is_undone_at_once(session_dir):
    """Bug 1: one bulk action was written as one batch per suggested label, so undo took back one label."""
    path = workspace_file(session_dir)
    suggested = suggestion_of(path)
    at = new_session("views/review.py")
    chosen, labels = [], set()
    for index in card_indices(at, acceptable=True):  # cards whose suggestions differ
        if suggested[index] not in labels:
            chosen.append(index)
            labels.add(suggested[index])
        if len(chosen) == 3:
            break
    assert len(labels) >= 2, "the sample run needs cards with different suggestions"
    send(at, *({"action": "select", "index": i, "on": True} for i in chosen))
    at.button(key="bulk_accept").click().run()
    current = Workspace(path).decisions()
    assert dict(zip(current["index"], current["new_label"], strict=True)) == {i: suggested[i] for i in chosen}
    at.button(key="undo").click().run()
    assert Workspace(path).decisions().empty


def test_bulk_actions_skip_decided_cards_unless_told_to_overwrite(session_dir):
    """Bug 2: a bulk accept replaced the decisions made by hand on the page."""
    path = workspace_file(session_dir)
    at = new_session("views/review.py")
    kept, *others = card_indices(at, acceptable=True)[:3]
    send(at, {"action": "keep", "index": kept},
         *({"action": "select", "index": i, "on": True} for i in [kept, *others]))
    at.button(key="bulk_accept").click().run()
    current = Workspace(path).decisions().set_index("index")["action"].to_dict()
    assert current == {kept: "keep", **{i: "relabel" for i in others}}
    assert any("skipped 1 already decided" in t.value for t in at.toast)
    send(at, {"action": "select", "index": kept, "on": True})
    at.toggle(key="bulk_overwrite").set_value(True).run()
    at.button(key="bulk_drop").click().run()
    assert Workspace(path).decisions().set_index("index").loc[kept, "action"] == "drop"
    for _ in range(3):
        at.button(key="undo").click().run()
    assert Workspace(path).decisions().empty


def test_reclicking_accept_writes_no_duplicate_log_rows(session_dir):
    path = workspace_file(session_dir)
    at = new_session("views/review.py")
    card = next(c for c in cards(at) if c["s"] != c["g"])
    rows_before = len(Workspace(path).decision_log())
    send(at, {"action": "relabel", "index": card["i"], "label": card["s"]})
    send(at, {"action": "relabel", "index": card["i"], "label": card["s"]})  # a second press, a new number
    assert len(Workspace(path).decision_log()) == rows_before + 1
    at.button(key="undo").click().run()
    assert Workspace(path).decisions().empty


def test_review_settings_survive_a_page_switch_and_a_reload(session_dir):
    """Bug 4: the ranking, cut, page size and filter reset when the user visited another page."""
    at = new_session("views/review.py")
    at.number_input(key="review_cut").set_value(30).run()
    at.toggle(key="review_only_flagged").set_value(False).run()
    at.selectbox(key="review_per_page").set_value(48).run()
    assert len(cards(at)) == 48
    at.switch_page("views/detail.py").run()
    at.switch_page("views/review.py").run()
    fresh = new_session("views/review.py")  # a reload: a new session on the same run
    for session in (at, fresh):
        assert not session.exception, session.exception
        assert session.number_input(key="review_cut").value == 30
        assert session.toggle(key="review_only_flagged").value is False
        assert session.selectbox(key="review_per_page").value == 48
        assert len(cards(session)) == 48
    assert not [w for w in at.warning if "default value" in w.value]  # review_cut: no default beside session state
    fresh.number_input(key="review_cut").set_value(max(10, round(0.1 * 1078))).run()
    fresh.toggle(key="review_only_flagged").set_value(True).run()
    fresh.selectbox(key="review_per_page").set_value(24).run()


def test_flag_down_to_here_sets_the_cut_without_a_warning(session_dir):
    at = new_session("views/review.py")
    at.session_state["review_panel_depth"] = True  # the depth panel opened
    at.run()
    at.button(key="flag_down_to").click().run()
    cut = at.number_input(key="review_cut").value
    at.run()
    assert not at.exception and not [w for w in at.warning if "default value" in w.value]
    assert new_session("views/review.py").number_input(key="review_cut").value == cut  # stored with the run
    at.number_input(key="review_cut").set_value(max(10, round(0.1 * 1078))).run()
    at.session_state["review_panel_depth"] = False
    at.run()


@pytest.mark.slow
def test_tsne_map_is_computed_in_the_background(session_dir):
    """t-SNE took the page for ~30 s: now the gallery is usable while a background job computes it."""
    at = new_session("views/review.py")
    at.radio(key="map_method").set_value("tsne").run()
    assert not at.exception, at.exception
    assert len(cards(at)) == 24  # the gallery is drawn while the map is computed
    finish_jobs()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("feature map" in chart.proto.spec for chart in at.get("plotly_chart"))  # the t-SNE map is drawn
    at.radio(key="map_method").set_value("pca").run()


@pytest.fixture
def two_methods(folder, tmp_path, monkeypatch):
    """A copy of the scored workspace with a second ranking ("margin": the loss ranking reversed, with other
    suggestions), so the gallery and the detail page can disagree."""
    import shutil

    shutil.copytree(folder / "workspaces", tmp_path / "workspaces")
    workspace = Workspace(workspace_file(tmp_path))
    key = workspace.runs()["config_hash"][0]
    loss = workspace.results(key)["loss"]
    workspace.save_result(key, ScoreResult("margin", -loss.scores, (loss.suggested_labels + 1) % 10, {}, {}))
    monkeypatch.chdir(tmp_path)
    return workspace, key


def test_sample_detail_follows_the_gallery_ranking(two_methods):
    """Bug 5: card #1 of another ranking opened as "rank 149 by loss", with loss's suggestion."""
    workspace, key = two_methods
    margin = workspace.results(key)["margin"]
    data = load_run_data(RunSettings(noise_rate=NOISE, noise_kind=KIND, epochs=2))
    top = int(np.argmin(ranks(margin.scores)))
    at = new_session("views/review.py")
    at.selectbox(key="review_method").set_value("margin").run()
    send(at, {"action": "detail", "index": int(data.train.index[top])})
    assert [t.value for t in at.title] == ["Sample detail"]
    assert any(f"rank **1** of {len(data.train)} by **margin**" in m.value for m in at.markdown)
    suggested = data.train.class_names[int(margin.suggested_labels[top])]
    assert at.button(key="detail_accept").label == f"Accept {suggested}"


# -- issue 17: the walk's findings ------------------------------------------------------------------

def test_the_gallery_comes_first_and_the_depth_estimate_is_one_closed_line(session_dir):
    """Finding 9: "How deep to review" was open above the gallery, so no thumbnail showed on arrival."""
    at = new_session("views/review.py")
    order = [e for e in at.main.children.values()]
    gallery = next(i for i, e in enumerate(order) if any(getattr(x, "type", None) == "bidi_component"
                                                         for x in _elements(e)))
    overview = next(i for i, e in enumerate(order) if getattr(e, "label", "").startswith("Overview"))
    assert gallery < overview  # the grid before the charts and the filters
    (depth,) = [e for e in at.expander if e.label.startswith("How deep to review")]
    assert "down to **#" in depth.label and "estimated errors" in depth.label  # the summary, in one line
    assert not [m for m in at.metric if m.label == "Review down to"]  # closed: opened on demand


def test_a_change_of_ranking_cut_or_filter_starts_the_gallery_at_page_1(session_dir):
    """Finding 3: after a filter or a change of ranking the gallery showed the last page, not page 1."""
    at = new_session("views/review.py")
    at.toggle(key="review_only_flagged").set_value(False).run()
    at.button(key="next_page").click().run()
    at.button(key="next_page").click().run()
    assert gallery_data(at)["page"] == 3
    at.multiselect(key="filter_given").set_value([1, 2]).run()
    assert gallery_data(at)["page"] == 1
    at.button(key="next_page").click().run()
    assert gallery_data(at)["page"] == 2
    at.number_input(key="review_cut").set_value(200).run()
    assert gallery_data(at)["page"] == 1
    at.multiselect(key="filter_given").set_value([]).run()
    at.number_input(key="review_cut").set_value(max(10, round(0.1 * 1078))).run()
    at.toggle(key="review_only_flagged").set_value(True).run()


def test_the_go_to_page_box_follows_the_pager_and_the_keys(session_dir):
    """Finding 6: the "Go to page" box did not follow N / P and the Previous / Next buttons."""
    at = new_session("views/review.py")
    at.toggle(key="review_only_flagged").set_value(False).run()
    at.button(key="next_page").click().run()
    assert at.number_input(key="gallery_goto").value == 2
    send(at, {"action": "page", "page": 4})  # N pressed twice in the browser
    assert at.number_input(key="gallery_goto").value == 4 and gallery_data(at)["page"] == 4
    at.number_input(key="gallery_goto").set_value(3).run()
    assert gallery_data(at)["page"] == 3
    at.toggle(key="review_only_flagged").set_value(True).run()


def test_the_last_bulk_note_stays_with_its_run(session_dir):
    """Finding 10: the "last bulk action" message was carried over to another run."""
    at = new_session("views/review.py")
    chosen = card_indices(at)[:2]
    send(at, *({"action": "select", "index": i, "on": True} for i in chosen))
    at.button(key="bulk_keep").click().run()
    assert any("last bulk action" in c.value for c in at.caption)
    at.button(key="undo").click().run()
    at.switch_page("views/setup.py").run()
    at.session_state["known_runs"] = {"selection": {"rows": [0], "columns": []}}  # open a run from the table
    at.run()
    assert not any("last bulk action" in c.value for c in at.caption)


@pytest.fixture
def carved(tmp_path, monkeypatch):
    """A stored run on an own .npz with a validation set carved from its training data, and an ``fvm``
    result whose validation model fits the given labels exactly (as θ̃ does when it is fine-tuned on
    labels as noisy as the ones it judges)."""
    from engine.runs import config_hash

    rng = np.random.default_rng(0)
    data_path = tmp_path / "own.npz"
    np.savez(data_path, images=rng.integers(0, 256, (300, 8, 8), dtype=np.uint8), labels=np.arange(300) % 10)
    settings = RunSettings(data=str(data_path), val_from_train=0.2, epochs=1)
    data = load_run_data(settings)
    key = config_hash(settings, data)
    workspace = Workspace.for_data(settings.data_key(), tmp_path / "workspaces")
    workspace.save_run(key, settings.to_dict())
    n = len(data.train)
    logits = rng.normal(size=(n, 10)).astype(np.float32)
    workspace.save_arrays(key, {"logits": logits, "features": rng.normal(size=(n, 4)).astype(np.float32)})
    fitted = np.full((n, 10), 0.001)
    fitted[np.arange(n), data.train.labels] = 0.991
    workspace.save_result(key, ScoreResult("fvm", rng.random(n), (data.train.labels + 1) % 10, {}, {},
                                           arrays={"probabilities": fitted}))
    monkeypatch.chdir(tmp_path)
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["run"], at.query_params["workspace"] = key, workspace.path.stem
    return at, data


def test_a_carved_validation_set_gives_no_confident_review_depth(carved):
    """Finding 1: "review down to 0" on an own folder with a carved validation set (17 real errors)."""
    at, data = carved
    at.run().switch_page("views/review.py").run()
    assert not at.exception, at.exception
    (depth,) = [e for e in at.expander if e.label.startswith("How deep to review")]
    assert "no reliable estimate" in depth.label and "carved" in depth.label
    at.session_state["review_panel_depth"] = True
    at.run()
    assert not [m for m in at.metric if m.label == "Review down to"]
    assert any("trained model (unreliable" in c.value for c in at.caption)


def test_review_estimate_ignores_the_validation_model_of_a_carved_set():
    """The engine side of finding 1: θ̃ fitted to carved, noisy labels is not a source of the estimate."""
    rng = np.random.default_rng(1)
    labels = np.arange(200) % 4
    fitted = np.full((200, 4), 0.01)
    fitted[np.arange(200), labels] = 0.97
    trained = rng.dirichlet(np.ones(4), 200)
    results = {"fvm": ScoreResult("fvm", rng.random(200), labels, {}, {}, arrays={"probabilities": fitted})}
    assert review_estimate(results, "fvm", labels, trained).source == "fvm"
    untrusted = review_estimate(results, "fvm", labels, trained, trusted_validation=False)
    assert untrusted.source != "fvm" and untrusted.source.startswith("trained model (unreliable")


def test_typing_a_carved_out_index_on_the_detail_page_says_so(carved):
    """Finding 7: the index of a sample carved into validation jumped to another sample silently."""
    at, data = carved
    at.run()
    carved_index = int(data.validation.index[0])
    at.session_state["detail_index"] = carved_index
    at.switch_page("views/detail.py").run()
    assert not at.exception, at.exception
    assert any(f"Sample {carved_index} is not scored: it was carved into the validation set" in w.value
               for w in at.warning)


def test_close_the_loop_rescoring_with_reviewed_samples(session_dir):
    """Runs last in this module: it makes the re-scored run the latest one in the workspace."""
    needing = [m for m in available_methods() if scorer_class(m).requires_validation]
    if not needing:
        pytest.skip("no registered method needs a validation set")
    path = workspace_file(session_dir)
    at = new_session("views/review.py")
    accepts = [c for c in cards(at) if c["s"] != c["g"]][:2]
    send(at, *({"action": "relabel", "index": c["i"], "label": c["s"]} for c in accepts))
    at.switch_page("views/loop.py").run()
    at.multiselect(key="loop_methods").set_value([needing[0]]).run()
    assert any(m.value.startswith("Estimated time on this device: **≈") and "re-scoring" in m.value
               for m in at.markdown)  # finding 11: said before the button
    before = at.session_state["active"][1]
    at.button(key="loop_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    finish_jobs()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.session_state["active"][1] == before  # issue 12: the active run was switched silently
    workspace = Workspace(path)
    latest = workspace.runs()["config_hash"][0]
    loop = workspace.report(latest, "loop")
    assert loop["size"] == 359 + 2  # the trusted sample:val split plus the two relabeled samples
    assert sorted(loop["reviewed"]) == sorted(c["i"] for c in accepts)
    assert workspace.methods(latest) == [needing[0]]
    assert [m.label for m in at.metric][1] == f"AUROC on the unreviewed samples, {needing[0]}"
    assert len(at.dataframe[0].value) == 15  # the samples that climbed most

    at.button(key="loop_open").click().run()  # opening the re-scored run is explicit, and said
    assert at.session_state["active"][1] == latest
    assert any("Now showing the re-scored run" in m.value for m in at.success)
    at.switch_page("views/review.py").run()
    assert not at.exception
    # issue 12: the reviewed samples in the validation set tripped the product's own overlap warning
    assert not any("also appear in the training set" in w.value for w in at.warning), [w.value for w in at.warning]
    at.switch_page("views/loop.py").run()
    at.button(key="loop_back").click().run()
    assert at.session_state["active"][1] == before


@pytest.mark.slow
def test_why_page_prepares_in_the_background_then_shows_the_four_steps(tmp_path, monkeypatch):
    from engine.demo import DemoSettings, cached_demo

    monkeypatch.chdir(tmp_path)
    at = new_session("views/why.py")
    at.toggle(key="why_quick").set_value(True).run()
    assert not at.subheader  # nothing prepared yet: only the button
    # finding 11: the demo (520 s on the sample) says its time before the button is pressed
    assert any(m.value.startswith("Estimated time on this device: **at least ≈") for m in at.markdown)
    at.button(key="why_prepare").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    finish_jobs()
    settings = DemoSettings().quick()
    assert cached_demo(settings, tmp_path / "workspaces" / "demo") is not None
    at.run()  # the job is done: the same session now shows the demo
    assert not at.exception and len(at.subheader) == 4

    again = new_session("views/why.py")  # a fresh session: drawn straight from the cache, no button
    again.toggle(key="why_quick").set_value(True).run()
    assert not again.exception and not again.error, [e.value for e in again.error]
    assert [s.value[:1] for s in again.subheader] == ["1", "2", "3", "4"]
    assert len(again.get("plotly_chart")) == 3
    assert len(again.get("image")) == settings.top
    assert not [b for b in again.button if b.key == "why_prepare"]


def stored_quick_demo(folder: Path, loss: list[float], fvm: list[float]) -> None:
    """A "Why it works" cache with chosen figures, as ``engine.demo.run_demo`` writes it (no training)."""
    from engine.demo import FORMAT, DemoSettings

    settings = DemoSettings().quick()
    rows = [{"position": i, "index": i, "given": 0, "suggested": 1, "true": 1, "flipped": True, "score": 1.0}
            for i in range(settings.top)]
    numbers = {
        "format": FORMAT, "key": settings.key(), "seconds": 1.0,
        "data": {"source": "digits", "class_names": [str(c) for c in range(10)], "train": 100, "validation": 10,
                 "test": 10, "flipped": 20, "image_shape": [8, 8]},
        "budgets": {"epochs": list(settings.budgets), "memorized": [0.0, 0.1],
                    "auroc": {"loss": loss, "cleanlab": [0.9, 0.9], "fvm": fvm}},
        "landscape": {"alphas": [-0.5, 0.0, 0.5], "loss": {"sgd": [2.0, 1.0, 2.0], "sam": [1.5, 1.0, 1.5]},
                      "per_direction": {"sgd": [[2.0, 1.0, 2.0]], "sam": [[1.5, 1.0, 1.5]]},
                      "rise": {"sgd": 1.0, "sam": 0.5}, "epochs": 5},
        "top": {"epochs": 5, "rows": rows, "flipped_in_top": settings.top},
        "recovery": {"epochs": 5, "before": 0.9, "clean": 0.95, "points": [{"k": 10, "relabeled": 10,
                                                                            "relabeled_right": 9, "accuracy": 0.93}]}}
    demo_folder = folder / "workspaces" / "demo"
    demo_folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(demo_folder / f"demo-{settings.key()}.npz",
                        images=np.zeros((settings.top, 8, 8), dtype=np.uint8))
    (demo_folder / f"demo-{settings.key()}.json").write_text(json.dumps(numbers))


@pytest.mark.parametrize(("loss", "fvm", "says_loss_fails"), [([0.977, 0.999], [0.99, 0.998], False),
                                                             ([0.99, 0.90], [0.99, 0.995], True)])
def test_why_page_headline_follows_the_measured_aurocs(tmp_path, monkeypatch, loss, fvm, says_loss_fails):
    monkeypatch.chdir(tmp_path)
    stored_quick_demo(tmp_path, loss, fvm)
    at = new_session("views/why.py")
    at.toggle(key="why_quick").set_value(True).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    headline = at.subheader[0].value
    assert ("loss stops finding the errors" in headline) is says_loss_fails, headline
    assert any(f"{loss[0]:.3f} → **{loss[-1]:.3f}**" in m.value for m in at.markdown)


def test_own_folder_gets_defaults_that_fit_it_a_preview_and_a_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = write_image_folder(make_dataset(classes=3, per_class=8, shape=(12, 12)), tmp_path / "own")
    save_image(np.zeros((16, 20), dtype=np.uint8), root / "class_2" / "wide.png")
    at = new_session()
    assert at.radio(key="setup_val_mode").value == "trusted" and at.toggle(key="setup_demo").value  # the digits
    at.text_input(key="setup_data").set_value(str(root)).run()
    assert not at.exception
    assert at.radio(key="setup_val_mode").value == "none"
    assert at.text_input(key="setup_test").value == "" and at.toggle(key="setup_demo").value is False
    chosen = at.multiselect(key="setup_methods").value
    assert chosen and not any(scorer_class(m).requires_validation for m in chosen)  # finding 12: none were left
    preview = next(m.value for m in at.markdown if "images in" in m.value)
    assert preview.startswith("**25** images in **3** classes, trained as 12×12 grayscale") and "**1** of" in preview
    assert at.dataframe[0].value["images"].tolist() == [9, 8, 8]  # the preview comes first
    assert any(m.value.startswith("Estimated time on this device") for m in at.markdown)
    assert at.button(key="setup_suggest_carve")  # no validation set: carving is offered
    at.multiselect(key="setup_methods").set_value(["loss"])
    at.number_input(key="setup_epochs_fast-cpu").set_value(1)
    at.button(key="run").click().run()  # issue 12: failed with the digits' validation and test sets
    assert not at.exception and not at.error, [e.value for e in at.error]
    finish_jobs()
    at.run()
    assert not at.exception and [t.value for t in at.title] == ["Review the suspects"]


def test_carve_suggestion_switches_the_validation_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = write_image_folder(make_dataset(classes=3, per_class=8, shape=(12, 12)), tmp_path / "own")
    at = new_session()
    at.text_input(key="setup_data").set_value(str(root)).run()
    at.button(key="setup_suggest_carve").click().run()
    assert at.radio(key="setup_val_mode").value == "carve" and at.slider(key="setup_carve").value == 0.1


def test_page_names_match_their_headings(tmp_path, monkeypatch):
    import re

    source = (REPO_ROOT / "dashboard" / "app.py").read_text()
    pages = re.findall(r'st\.Page\("(views/\w+\.py)", title="([^"]+)"', source)
    assert len(pages) == 8
    monkeypatch.chdir(tmp_path)
    at = new_session()
    for page, title in pages:
        at.switch_page(page).run()
        assert [t.value for t in at.title][:1] == [title], page


def test_runs_table_says_what_each_run_is_and_opens_one_by_click(session_dir):
    at = new_session()
    table = at.dataframe[0].value  # on the sample data the runs table is the page's only table
    assert {"methods", "validation", "created", "last used"} <= set(table.columns)
    assert "trusted: sample:val" in table["validation"].tolist()
    at.session_state["known_runs"] = {"selection": {"rows": [0], "columns": []}}  # what a click on row 0 sends
    at.run()
    assert not at.exception
    assert at.session_state["active"][1] == table["run"][0]
    assert [t.value for t in at.title] == ["Review the suspects"]
    # finding 4: the open run stays in the URL after the page switch, so a reload opens it again
    assert at.query_params["run"] == table["run"][0]
    assert at.query_params["workspace"] == table["workspace"][0].removesuffix(".sqlite")
    assert any(m.value.startswith("Opened the run of") for m in at.success)
