"""``influence-lens dashboard``: the ``streamlit run`` command, safe by default, and its lifetime.

The server listens on 127.0.0.1 unless ``--server.address`` says otherwise: the dashboard has no
login, and its data fields read files on the server. Listening on another address needs a data
root (``--data-root DIR``): the dashboard then opens only data under it. Streamlit's developer
menu and Deploy button are hidden (``client.toolbarMode``). The launcher forwards SIGTERM, SIGINT
and SIGHUP to the server and waits for it, so stopping the launcher stops the server; on Linux the
server also gets SIGTERM if the launcher dies without forwarding (SIGKILL).
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from pathlib import Path

from engine.errors import InfluenceLensError
from engine.safe_files import check_folder

LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOOLBAR_MODE = "viewer"  # no Deploy button, no rerun / clear-cache developer options
APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def streamlit_options(extra: list[str]) -> dict[str, str]:
    """``--server.port 9000`` / ``--server.port=9000`` pairs as a dict (the last of a repeated option wins)."""
    options, pending = {}, None
    for item in extra:
        if pending is not None:
            options[pending], pending = item, None
        elif item.startswith("--") and "=" in item:
            name, _, value = item[2:].partition("=")
            options[name] = value
        elif item.startswith("--"):
            pending = item[2:]
        else:
            raise InfluenceLensError(f"unexpected argument {item!r} for streamlit (options are --name value)")
    if pending is not None:
        raise InfluenceLensError(f"--{pending} needs a value")
    return options


def streamlit_command(*, data: str, port: int, workspace: str | None, data_root: str | None,
                      extra: list[str]) -> tuple[list[str], list[str]]:
    """The ``streamlit run`` command and the lines to tell the user first (where it listens, warnings).

    Each streamlit option appears once: ``--server.port`` given among ``extra`` wins over ``--port``.
    """
    options = {"server.port": str(port), "server.address": "127.0.0.1", "browser.gatherUsageStats": "false",
               "client.toolbarMode": TOOLBAR_MODE, **streamlit_options(extra)}
    address = options["server.address"]
    _check_port(options["server.port"])
    notes = []
    app_args = ["--data", data]
    if workspace is not None:
        app_args += ["--workspace", str(check_folder(workspace, [data]))]
    if data_root is not None:
        root = Path(data_root)
        if not root.is_dir():
            raise InfluenceLensError(f"{data_root}: --data-root is not a folder")
        app_args += ["--data-root", str(root.resolve())]
    if address in LOOPBACK:
        notes.append(f"listening on {address} only (this machine); --server.address 0.0.0.0 with --data-root DIR "
                     "shares it on the network")
    else:
        if data_root is None:
            raise InfluenceLensError(f"--server.address {address} shares the dashboard on the network, where anyone "
                                     "can read files through its data fields: give --data-root DIR, the only folder "
                                     "it may read data from")
        notes.append(f"warning: listening on {address}: anyone who can reach this machine can use the dashboard "
                     f"(no login) and read the data under {Path(data_root).resolve()}")
    command = [sys.executable, "-m", "streamlit", "run", str(APP)]
    for name, value in options.items():
        command += [f"--{name}", value]
    return [*command, "--", *app_args], notes


def _check_port(port: str) -> None:
    """A TCP port, 1..65535 (the server would fail later with an OverflowError traceback)."""
    try:
        number = int(port)
    except ValueError:
        number = None
    if number is None or not 1 <= number <= 65535:
        raise InfluenceLensError(f"--port must be a TCP port from 1 to 65535, got {port}")


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the launcher dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def run(command: list[str]) -> int:
    """Run the server until it exits; a stop signal to the launcher is passed on to it first."""
    server = subprocess.Popen(command, preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def forward(signum, _frame) -> None:
        if server.poll() is None:
            server.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED}
    try:
        status = server.wait()  # a handled signal interrupts the wait, which then resumes (PEP 475)
        return 128 - status if status < 0 else status  # killed by signal N: the shell's 128 + N
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
