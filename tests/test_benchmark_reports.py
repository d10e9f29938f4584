"""The benchmark scripts write their own results files (``--out``): the command that ran, the machine,
what they printed (JSON rows fenced, tables as they are) and a note; nothing pasted by hand."""

import argparse
import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from benchmarks.reports import add_results_arguments, command_line, results_file

SCRIPTS = ("influence_settings", "speed", "time_estimate", "click_latency", "image_size_memory", "streaming_memory",
           "noise_floors")


def _args(*argv: str, append: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_results_arguments(parser, append=append)
    return parser.parse_args(argv)


def test_a_results_file_holds_the_command_the_rows_the_table_and_the_note(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.md"
    monkeypatch.setattr(sys, "argv", [str(REPO_ROOT / "benchmarks" / "x.py"), "--out", str(out), "--n", "2"])
    with results_file(_args("--out", str(out), "--note", "What it shows."), "A title"):
        print(json.dumps({"rows": 1, "seconds": 0.5}))
        print(json.dumps({"rows": 2, "seconds": 0.7}))
        print("\n| rows | seconds |\n|---:|---:|\n| 1 | 0.5 |")
    assert "| 1 | 0.5 |" in capsys.readouterr().out  # still printed
    lines = out.read_text().splitlines()
    assert lines[0] == "# A title"
    assert lines[2:5] == ["```", f"python benchmarks/x.py --out {out} --n 2", "```"]
    assert lines[6].startswith("Run ") and "torch" in lines[6] and "load average" in lines[6]
    block = lines.index('{"rows": 1, "seconds": 0.5}')
    assert lines[block - 1] == "```" and lines[block + 2] == "```"
    assert json.loads(lines[block + 1]) == {"rows": 2, "seconds": 0.7}
    assert "| 1 | 0.5 |" in lines and lines[-1] == "What it shows."


def test_append_adds_a_section_and_a_failed_run_writes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "r.md"
    monkeypatch.setattr(sys, "argv", ["b.py", "first"])
    with results_file(_args("--out", str(out), append=True), "Title"):
        print("| a |")
    monkeypatch.setattr(sys, "argv", ["b.py", "second"])
    with results_file(_args("--out", str(out), "--append", append=True), "Title"):
        print("| b |")
    text = out.read_text()
    assert text.count("# Title") == 1 and text.index("| a |") < text.index("b.py second") < text.index("| b |")
    with pytest.raises(RuntimeError), results_file(_args("--out", str(out)), "Title"):
        print("| c |")
        raise RuntimeError("the run failed")
    assert out.read_text() == text
    assert command_line(["python_file.py", "a b"]) == "python python_file.py 'a b'"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_pasted_benchmark_has_a_script_that_writes_its_file(script):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / f"{script}.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--out OUT" in result.stdout and "--note NOTE" in result.stdout
    assert ("--append" in result.stdout) == (script == "influence_settings")
