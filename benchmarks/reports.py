"""Results files a benchmark writes itself (``--out``): the command that ran, where and when, what it
printed, and a note. Standard library only (torch imported when the file is written), so a measuring
child process that imports this module keeps its memory baseline."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

def add_results_arguments(parser: argparse.ArgumentParser, *, append: bool = False) -> None:
    """``--out FILE.md`` (write the results file: the command, the machine, what was printed), ``--note``
    (a reading to put under it) and, for scripts whose file holds several runs, ``--append``."""
    parser.add_argument("--out", default=None, help="write this results file (Markdown) besides printing")
    parser.add_argument("--note", default="", help="what the figures show, written under them in --out")
    if append:
        parser.add_argument("--append", action="store_true", help="add this run as a section of --out")


def run_context() -> str:
    """When and where a benchmark ran: what its seconds depend on."""
    import torch

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()} with "
            f"{os.cpu_count()} cores ({device}), torch {torch.__version__} with {torch.get_num_threads()} "
            f"thread(s), load average {load} at the end.")


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran, as one would type it from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    with contextlib.suppress(ValueError):
        argv[0] = str(script.relative_to(REPO_ROOT))
    return "python " + " ".join(shlex.quote(a) for a in argv)


def render_results(title: str, command: str, context: str, printed: list[str], note: str = "",
                   existing: str | None = None) -> str:
    """A results file: the title (unless appended to ``existing``), the command, the run's context, what
    the script printed (runs of JSON lines fenced as code, tables and text as they are) and the note."""
    body, block = ["```", command, "```", "", context, ""], []
    for line in [*printed, ""]:
        if line.startswith("{"):
            block.append(line)
            continue
        if block:
            body += ["```", *block, "```"]
            block = []
        body.append(line)
    if note:
        body += [note, ""]
    text = "\n".join(body).strip("\n") + "\n"
    return f"{existing.rstrip()}\n\n{text}" if existing else f"# {title}\n\n{text}"


class _Tee(io.TextIOBase):
    def __init__(self, stream, copy: io.StringIO):
        self.stream, self.copy = stream, copy

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def results_file(args: argparse.Namespace, title: str) -> Iterator[None]:
    """Everything printed inside goes to stdout as before and, with ``--out``, into that results file
    (:func:`render_results`), written once the run ends without an error (temporary file, then renamed)."""
    if not getattr(args, "out", None):
        yield
        return
    out = Path(args.out)
    if not out.parent.is_dir():
        raise SystemExit(f"{out.parent}: folder not found (--out)")
    copy, stdout = io.StringIO(), sys.stdout
    sys.stdout = _Tee(stdout, copy)
    try:
        yield
    finally:
        sys.stdout = stdout
    existing = out.read_text() if getattr(args, "append", False) and out.is_file() else None
    text = render_results(title, command_line(), run_context(), copy.getvalue().splitlines(), args.note, existing)
    temporary = out.with_name(f".{out.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, out)
