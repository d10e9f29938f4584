"""Safe by default (issue 13, issue 12 bugs 7 and 11): the dashboard on a network, data-derived text,
spreadsheet exports, and a launcher that takes its server down with it."""

from __future__ import annotations

import html
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomllib
from conftest import REPO_ROOT, make_dataset, save_image

from dashboard import charts
from dashboard.text import md
from engine.cli import main
from engine.errors import InfluenceLensError
from engine.launch import APP, TOOLBAR_MODE, streamlit_command
from engine.pipeline import read_decisions
from engine.safe_files import check_within_root, spreadsheet_safe

HOSTILE = ["![x](https://example.com/p.png)", "[click](https://example.com)", "$x^2$", ":red[alarm]",
           "<img src=x onerror=alert(1)>", "**bold**\n\n# heading", "a`b`c", "=HYPERLINK(\"http://x\")"]


def _options(command: list[str]) -> dict[str, list[str]]:
    """Every ``--name value`` before the app's own ``--`` arguments, by name (repeats kept)."""
    seen: dict[str, list[str]] = {}
    before = command[:command.index("--")]
    for name, value in zip(before[5::2], before[6::2], strict=True):
        seen.setdefault(name, []).append(value)
    return seen


# -- the launcher ---------------------------------------------------------------------------------

def test_the_launcher_binds_to_this_machine_and_hides_the_developer_menu():
    command, notes = streamlit_command(data="sample", port=8501, workspace=None, data_root=None, extra=[])
    options = _options(command)
    assert command[4] == str(APP)
    assert options["--server.address"] == ["127.0.0.1"] and options["--client.toolbarMode"] == [TOOLBAR_MODE]
    assert notes == ["listening on 127.0.0.1 only (this machine); --server.address 0.0.0.0 with --data-root DIR "
                     "shares it on the network"]


@pytest.mark.parametrize("extra", [["--server.port", "9000"], ["--server.port=9000"]])
def test_a_port_given_to_streamlit_appears_once(extra):
    """Issue 12: --server.port was passed twice (the launcher's own from --port, then the user's)."""
    options = _options(streamlit_command(data="sample", port=8501, workspace=None, data_root=None, extra=extra)[0])
    assert options["--server.port"] == ["9000"]
    assert all(len(values) == 1 for values in options.values())


def test_a_network_address_needs_a_data_root_and_warns(tmp_path, capsys):
    assert main(["dashboard", "--server.address", "0.0.0.0"]) == 2
    assert "--server.address 0.0.0.0 shares the dashboard on the network" in capsys.readouterr().err
    command, notes = streamlit_command(data="sample", port=8501, workspace=None, data_root=str(tmp_path),
                                       extra=["--server.address", "0.0.0.0"])
    assert _options(command)["--server.address"] == ["0.0.0.0"]
    assert command[-2:] == ["--data-root", str(tmp_path.resolve())]
    assert notes[0].startswith("warning: listening on 0.0.0.0: anyone who can reach this machine")
    with pytest.raises(InfluenceLensError, match="--data-root is not a folder"):
        streamlit_command(data="sample", port=8501, workspace=None, data_root=str(tmp_path / "nope"), extra=[])


def test_the_dashboards_workspace_folder_is_checked_at_launch(tmp_path, capsys):
    (tmp_path / "ws").write_text("a file")
    assert main(["dashboard", "--workspace", str(tmp_path / "ws")]) == 2
    assert "--workspace is a file, not a folder" in capsys.readouterr().err


def test_a_plain_streamlit_run_gets_the_same_defaults():
    """The script-level config beside app.py: `streamlit run dashboard/app.py` from any folder."""
    config = tomllib.loads((REPO_ROOT / "dashboard" / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
    assert config["client"]["toolbarMode"] == TOOLBAR_MODE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "the launcher exited before the server answered"
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer")


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to follow the server process")
def test_sigterm_to_the_launcher_stops_the_streamlit_server(tmp_path):
    """Issue 12 bug 7: SIGTERM to `influence-lens dashboard` left the server running, adopted by PID 1."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    port = _free_port()
    launcher = subprocess.Popen([sys.executable, "-m", "engine.cli", "dashboard", "--port", str(port),
                                 "--server.headless", "true"], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        deadline = time.time() + 60
        while server is None and time.time() < deadline:
            children = _children(launcher.pid)
            server = children[0] if children else None
            time.sleep(0.2)
        assert server is not None, "the launcher started no server"
        _wait_healthy(f"http://127.0.0.1:{port}", launcher)  # up, with the launcher's options, on 127.0.0.1
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=60)
        deadline = time.time() + 30
        while _running(server) and time.time() < deadline:
            time.sleep(0.2)
        assert not _running(server), "the streamlit server outlived its launcher"
    finally:
        for pid in ([server] if server else []):
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


# -- the data root ----------------------------------------------------------------------------------

def test_the_data_root_refuses_paths_outside_it_without_saying_what_exists(tmp_path):
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (tmp_path / "private").mkdir()
    (root / "escape").symlink_to(tmp_path / "private")
    check_within_root(["data", str(root / "data"), "sample:val", None], root)  # inside: accepted
    messages = []
    for spec in (str(tmp_path / "private"), str(tmp_path / "no-such-folder"), "../private", "escape", "/etc"):
        with pytest.raises(InfluenceLensError) as caught:
            check_within_root([spec], root)
        messages.append(str(caught.value).removeprefix(spec))
    assert len(set(messages)) == 1 and "outside the data root" in messages[0]  # same words, exists or not


# -- data-derived text -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", HOSTILE)
def test_a_class_name_is_shown_as_text_not_markdown(name):
    """Every Markdown-active character is escaped, on one line: nothing is fetched, linked or formatted."""
    shown = md(name)
    bare = re.sub(r"&#\d+;", "", shown)  # character references (: . @) display as the character itself
    unescaped = [c for i, c in enumerate(bare) if c in "![]()<>$:*`#=" and (i == 0 or bare[i - 1] != "\\")]
    assert unescaped == [] and "\n" not in shown
    assert html.unescape(shown.replace("\\", "")) == " ".join(name.replace("\\", "").split())


def test_gallery_captions_escape_class_names():
    row = pd.Series({"rank": 1, "score": 0.5, "given": 0, "predicted": 1, "suggested": 1, "status": "relabel",
                     "new_label": 0})
    caption = charts.card_caption(row, (HOSTILE[0], HOSTILE[1]))
    assert "![x](" not in caption and "[click](" not in caption
    assert "\\!\\[x\\]\\(https&#58;" in caption


@pytest.mark.parametrize("name", ["https://example.com/cat", "see www.example.com", "cat http://x.io/a?b=c",
                                  "mail me@example.com"])
def test_a_url_in_a_class_name_is_shown_as_text_not_a_link(name):
    """Issue 19: GFM turns a bare URL into a live link even when its characters are escaped; the shown text
    keeps no URL or e-mail pattern, and reads back as the name."""
    shown = md(name)
    assert "://" not in shown and "www." not in shown and "@" not in shown
    assert html.unescape(shown.replace("\\", "")) == name
    row = pd.Series({"rank": 1, "score": 0.5, "given": 0, "predicted": 1, "suggested": 1, "status": "",
                     "new_label": -1})
    assert "://" not in charts.card_caption(row, (name, "b")) and "www." not in charts.card_caption(row, (name, "b"))


def test_chart_labels_show_html_as_text():
    """Plotly draws <a href> and <b> in chart text: class names reach the figures escaped."""
    figure = charts.probability_figure(np.array([0.5, 0.5]), ('<a href="https://example.com">x</a>', "<b>b</b>"),
                                       given=0, suggested=1)
    assert list(figure.data[0].x) == ['&lt;a href="https://example.com"&gt;x&lt;/a&gt;', "&lt;b&gt;b&lt;/b&gt;"]
    counts = np.array([[0, 2], [1, 0]])
    figure = charts.confusion_figure(counts, ("<i>a</i>", "b"))
    assert "<i>" not in str(figure.to_dict())


# -- spreadsheet exports -------------------------------------------------------------------------------

def test_exported_cells_cannot_run_as_formulas_and_read_back(tmp_path):
    """OWASP CSV injection: = + - @ (and tab / CR) at a text cell's start get a quote; numbers stay numbers;
    the quoted label still reads back as the class for `influence-lens retrain`."""
    frame = pd.DataFrame({"index": [0, 1, 2], "score": [-0.5, 1.0, 2.0],
                          "new_label": ["=1+1", "@SUM(A1)", "cat"], "action": ["relabel", "relabel", "relabel"]})
    safe = spreadsheet_safe(frame)
    assert safe["new_label"].tolist() == ["'=1+1", "'@SUM(A1)", "cat"]
    assert safe["score"].tolist() == [-0.5, 1.0, 2.0] and frame["new_label"][0] == "=1+1"  # a copy
    dataset = make_dataset(classes=3, per_class=2)
    dataset = dataset.__class__(dataset.images, dataset.labels, ("=1+1", "@SUM(A1)", "cat"))
    safe[["index", "action", "new_label"]].to_csv(tmp_path / "d.csv", index=False)
    assert read_decisions(str(tmp_path / "d.csv"), dataset)["new_label"].tolist() == [0, 1, 2]


def test_classes_quote_equals_x_and_equals_x_export_apart_and_read_back_apart(tmp_path):
    """Issue 19: "'=x" and "=x" both exported as "'=x", and retrain mapped both to one class."""
    dataset = make_dataset(classes=3, per_class=2)
    dataset = dataset.__class__(dataset.images, dataset.labels, ("'=x", "=x", "'plain"))
    frame = pd.DataFrame({"index": [0, 1, 2], "action": ["relabel"] * 3, "new_label": list(dataset.class_names)})
    safe = spreadsheet_safe(frame)
    assert len(set(safe["new_label"])) == 3
    safe.to_csv(tmp_path / "d.csv", index=False)
    assert read_decisions(str(tmp_path / "d.csv"), dataset)["new_label"].tolist() == [0, 1, 2]


def test_a_folder_loaded_under_the_data_root_keeps_links_inside(tmp_path):
    """The one link policy: links inside the data's folder are followed (here: a class folder's file)."""
    from engine.data import load_dataset

    folder = tmp_path / "folder"
    for c in ("a", "b"):
        for i in range(2):
            save_image(np.full((6, 6), 40 * i, dtype=np.uint8), folder / c / f"{i}.png")
    (folder / "a" / "again.png").symlink_to(folder / "b" / "0.png")
    assert len(load_dataset(folder)) == 5


def test_streamed_scores_never_land_in_the_data(tmp_path):
    """The output guard covers the engine's streaming writer too (an .npy beside the manifest's images)."""
    from engine.config import TrainConfig
    from engine.streaming import ImageFiles, stream_scores
    from engine.training import train

    for c in ("a", "b"):
        for i in range(3):
            save_image(np.full((6, 6), 40 * i, dtype=np.uint8), tmp_path / "folder" / c / f"{i}.png")
    files = ImageFiles.open(tmp_path / "folder")
    trained = train(files.load(np.arange(len(files))), TrainConfig(epochs=1, device="cpu"))
    with pytest.raises(InfluenceLensError, match="out is, or lies inside, the input"):
        stream_scores(files, trained, "loss", tmp_path / "folder" / "a" / "s.npy", workers=0)
    (tmp_path / "mine.npy").write_bytes(b"not scores")
    with pytest.raises(InfluenceLensError, match="exists and was not written by influence-lens"):
        stream_scores(files, trained, "loss", tmp_path / "mine.npy", workers=0)
    stream_scores(files, trained, "loss", tmp_path / "s.npy", workers=0)
    assert len(stream_scores(files, trained, "loss", tmp_path / "s.npy", workers=0)) == 6  # its own file: replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written beside, then renamed


def test_the_dashboard_loads_data_only_under_its_data_root(tmp_path, monkeypatch):
    """``--data-root`` reaches the app: paths are read relative to it, and refused outside it."""
    import json

    from dashboard import state
    from engine.data import save_npz
    from engine.runs import RunSettings

    root = tmp_path / "root"
    root.mkdir()
    save_npz(make_dataset(per_class=4), root / "train.npz")
    save_npz(make_dataset(per_class=4), tmp_path / "outside.npz")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["app.py", "--data-root", str(root), "--workspace", str(tmp_path / "ws")])
    state.run_data.clear()
    loaded = state.run_data(json.dumps(RunSettings(data="train.npz").to_dict(), sort_keys=True))
    assert len(loaded.full_train) == 12
    with pytest.raises(InfluenceLensError, match="root/outside.npz: no such file"):  # relative to the root
        state.run_data(json.dumps(RunSettings(data="outside.npz").to_dict(), sort_keys=True))
    for spec in (str(tmp_path / "outside.npz"), "../outside.npz"):
        with pytest.raises(InfluenceLensError, match="outside the data root"):
            state.run_data(json.dumps(RunSettings(data=spec).to_dict(), sort_keys=True))
    (tmp_path / "ws").mkdir()  # the tool's own files (Close the loop's grown validation set) stay readable
    save_npz(make_dataset(per_class=2), tmp_path / "ws" / "grown.npz")
    settings = RunSettings(data="train.npz", validation=str(tmp_path / "ws" / "grown.npz"))
    assert len(state.run_data(json.dumps(settings.to_dict(), sort_keys=True)).validation) == 6


# -- issue 19: every input named on the command line, by identity; the workspace database; annotations --

def _npz(root: Path, name: str = "train.npz") -> Path:
    from engine.data import save_npz

    save_npz(make_dataset(), root / name)
    return root / name


def _score_args(*extra: str) -> list[str]:
    return ["score", "train.npz", "--method", "loss", "--epochs", "2", "--device", "cpu", *extra]


def _refused(args: list[str], root: Path, capsys, message: str) -> None:
    """Status 2, ``message`` in the last stderr line, and nothing in ``root`` changed."""
    from conftest import snapshot

    before = snapshot(root)
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last, last
    assert snapshot(root) == before


def _embeddings(root: Path) -> Path:
    np.save(root / "emb.npy", np.random.default_rng(0).normal(size=(18, 4)).astype(np.float32))
    return root / "emb.npy"


def _backbone(root: Path) -> Path:
    import torch

    torch.jit.save(torch.jit.script(torch.nn.Flatten()), root / "bb.pt")
    return root / "bb.pt"


def _weights(root: Path) -> Path:
    import torch

    torch.save({"w": torch.zeros(2)}, root / "w.pt")
    return root / "w.pt"


@pytest.mark.parametrize(("option", "make"), [("--embeddings", _embeddings), ("--backbone", _backbone),
                                              ("--weights", _weights)])
def test_out_over_a_start_file_is_refused_even_with_force(option, make, tmp_path, monkeypatch, capsys):
    """Issue 19: only TRAIN and --val were protected; --out with --force replaced the model files."""
    _npz(tmp_path)
    name = make(tmp_path).name
    monkeypatch.chdir(tmp_path)
    _refused(_score_args(option, name, "--out", name, "--force"), tmp_path, capsys,
             f"--out is, or lies inside, the input {tmp_path.resolve() / name}")


def test_a_hard_link_to_the_training_file_is_recognised(tmp_path, monkeypatch, capsys):
    _npz(tmp_path)
    (tmp_path / "other").mkdir()
    os.link(tmp_path / "train.npz", tmp_path / "other" / "copy.csv")
    monkeypatch.chdir(tmp_path)
    _refused(_score_args("--out", "other/copy.csv", "--force"), tmp_path, capsys,
             "--out is, or lies inside, the input")


def test_a_hard_link_to_an_image_of_the_manifest_is_recognised(tmp_path, monkeypatch, capsys):
    from conftest import write_manifest

    write_manifest(make_dataset(), tmp_path / "m.csv")
    image = next(p for p in tmp_path.rglob("*.png"))
    os.link(image, tmp_path / "out.csv")
    monkeypatch.chdir(tmp_path)
    args = ["score", "m.csv", "--method", "loss", "--epochs", "2", "--device", "cpu", "--out", "out.csv", "--force"]
    _refused(args, tmp_path, capsys, "--out is, or lies inside, the input")


def _can_bind_mount() -> bool:
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True) if shutil_which("unshare") else None
    return probe is not None and probe.returncode == 0


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


@pytest.mark.skipif(not _can_bind_mount(), reason="needs `unshare -m` (root or user namespaces) for a bind mount")
@pytest.mark.parametrize("where", ["--out view/scores.csv", "--workspace view/ws"])
def test_a_bind_mount_of_the_image_folder_is_recognised(where, tmp_path):
    """The same folder reached through a bind mount (other device path, same inode): --out and --workspace
    inside it are refused, in a private mount namespace so nothing outlives the test."""
    from conftest import snapshot, write_image_folder

    write_image_folder(make_dataset(), tmp_path / "folder")
    (tmp_path / "view").mkdir()
    before = snapshot(tmp_path / "folder")
    command = (f"mount --bind folder view && {sys.executable} -m engine.cli score folder --method loss --epochs 2 "
               f"--device cpu {where}")
    result = subprocess.run(["unshare", "-m", "sh", "-c", command], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "is, or lies inside, the input" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(tmp_path / "folder") == before


def test_the_workspace_database_is_never_an_output(tmp_path, monkeypatch, capsys):
    from engine.workspace import Workspace

    _npz(tmp_path)
    Workspace(tmp_path / "reviews.sqlite").decide([1], "drop")
    (tmp_path / "renamed.csv").write_bytes((tmp_path / "reviews.sqlite").read_bytes())
    monkeypatch.chdir(tmp_path)
    for name in ("reviews.sqlite", "renamed.csv"):
        _refused(_score_args("--out", name, "--force"), tmp_path, capsys, "is a workspace database")


def test_an_annotated_score_table_is_not_replaced_without_force(tmp_path, monkeypatch, capsys):
    """Our header is not enough: a table the user added a column to (or edited) is theirs now."""
    _npz(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(_score_args("--out", "s.csv")) == 0
    table = pd.read_csv(tmp_path / "s.csv")
    assert main(_score_args("--out", "s.csv", "--seed", "1")) == 0  # unchanged since we wrote it: replaced
    assert not pd.read_csv(tmp_path / "s.csv").equals(table)
    capsys.readouterr()
    annotated = pd.read_csv(tmp_path / "s.csv").assign(my_note="checked")
    annotated.to_csv(tmp_path / "s.csv", index=False)
    _refused(_score_args("--out", "s.csv"), tmp_path, capsys, "was not written by influence-lens (or was changed")
    assert main(_score_args("--out", "s.csv", "--force")) == 0
    capsys.readouterr()
    edited = pd.read_csv(tmp_path / "s.csv")
    edited.loc[0, "suggested_label"] = (edited.loc[0, "suggested_label"] + 1) % 3  # same columns, a value changed
    edited.to_csv(tmp_path / "s.csv", index=False)
    _refused(_score_args("--out", "s.csv"), tmp_path, capsys, "was not written by influence-lens")



# -- issue 19: the data root, for every path a page reads ----------------------------------------

def _root_app(tmp_path: Path, monkeypatch) -> Path:
    """The app's arguments as the launcher gives them: a data root with train.npz; the server's folder
    (the working directory) holds files that must stay out of reach."""
    from dashboard import state
    from engine.data import save_npz

    root = tmp_path / "root"
    root.mkdir()
    save_npz(make_dataset(per_class=4), root / "train.npz")
    (tmp_path / "samples").mkdir()
    save_npz(make_dataset(per_class=4), tmp_path / "samples" / "secret.npz")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["app.py", "--data-root", str(root), "--workspace", str(tmp_path / "ws")])
    state.run_data.clear()
    return root


def test_a_path_starting_with_sample_does_not_bypass_the_data_root(tmp_path, monkeypatch):
    import json

    from dashboard import state
    from engine.runs import RunSettings

    _root_app(tmp_path, monkeypatch)
    with pytest.raises(InfluenceLensError, match=r"root/samples/secret\.npz: no such file or folder"):
        state.run_data(json.dumps(RunSettings(data="samples/secret.npz").to_dict(), sort_keys=True))
    for spec in ("../samples/secret.npz", str(tmp_path / "samples" / "secret.npz")):
        with pytest.raises(InfluenceLensError, match="outside the data root"):
            state.readable(spec)


@pytest.mark.parametrize("field", ["weights", "backbone", "embeddings"])
def test_model_files_are_read_only_under_the_data_root_with_the_same_words(field, tmp_path, monkeypatch):
    """--weights / --backbone / --embeddings outside the root: refused, whether or not the file exists
    (an existence oracle before), before any file check."""
    import json

    from dashboard import state
    from engine.runs import RunSettings

    _root_app(tmp_path, monkeypatch)
    (tmp_path / "model.pt").write_bytes(b"exists")
    said = set()
    for path in (tmp_path / "model.pt", tmp_path / "absent.pt"):
        settings = RunSettings(data="train.npz", val_from_train=0.2, **{field: str(path)})
        with pytest.raises(InfluenceLensError) as refused:
            state.run_data(json.dumps(settings.to_dict(), sort_keys=True))
        said.add(str(refused.value).replace(str(path), "PATH"))
        with pytest.raises(InfluenceLensError, match="outside the data root"):
            state.readable_settings(settings)
    assert len(said) == 1 and "outside the data root" in said.pop()


@pytest.mark.slow
def test_the_set_up_preview_and_the_demo_page_stay_under_the_data_root(tmp_path, monkeypatch):
    """The set-up page's preview listed class folders outside the root, and its words told what exists;
    the "Why it works" page loaded data from anywhere."""
    from streamlit.testing.v1 import AppTest

    root = _root_app(tmp_path, monkeypatch)
    folder = tmp_path / "outside"
    for name in ("alpha", "beta"):
        save_image(np.zeros((8, 8), np.uint8), folder / name / "x.png")
    messages = []
    for spec in (str(folder), "../outside", str(tmp_path / "absent"), "../absent"):
        at = AppTest.from_file(str(REPO_ROOT / "dashboard" / "app.py"), default_timeout=120).run()
        at.text_input(key="setup_data").set_value(spec).run()
        shown = " ".join(w.value for w in at.warning) + " ".join(m.value for m in at.markdown)
        assert "outside the data root" in shown and "alpha" not in shown and "beta" not in shown, shown
        messages.append([w.value.replace(md(spec), "PATH") for w in at.warning if "data root" in w.value])
    assert all(m == messages[0] for m in messages)
    why = AppTest.from_file(str(REPO_ROOT / "dashboard" / "app.py"), default_timeout=120).run()
    why.switch_page("views/why.py").run()
    why.text_input(key="why_data").set_value(str(folder)).run()
    assert any("outside the data root" in e.value for e in why.error) and root.is_dir()
