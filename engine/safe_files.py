"""Every file the tool writes passes one guard: never onto or into the user's data, never over a file it
did not write, never half-written.

:func:`check_output` runs before any work (a run that trains for an hour must not fail, or hang on a
FIFO, at the end): the path must not be an input or lie inside an input folder, compared twice: by
the resolved path (links followed) and by identity (device and inode of the path and of each folder
above it), so a hard link, a bind mount or any second path to an input is recognised too. A
workspace database is never an output. An existing file must be a regular file written by this tool
(or ``force``): a score table whose bytes still match the checksum recorded when it was written
(:func:`remember_written`), so a table the user has annotated since is not replaced. Its folder
must exist and be writable. :func:`write_atomically` writes through a temporary file in the same
folder and a rename, so a kill or a full disk leaves the old file or the new one, never a torn one.
:func:`check_folder` is the same guard for a folder the tool writes into (the workspace folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

import pandas as pd

from engine.data import manifest_files
from engine.errors import DataError, InfluenceLensError

# A score table's header: a CSV starting with it was written by ``influence-lens score``.
SCORE_CSV_HEADER = "index,score,rank,given_label,predicted_label,suggested_label"
# data read from files carries each row's path beside its index (engine.cli._write_scores)
SCORE_CSV_HEADERS = (SCORE_CSV_HEADER, SCORE_CSV_HEADER.replace("index,", "index,path,", 1))
SCORE_TABLE_STARTS = ("index,score,rank,", "index,path,score,rank,")  # class-name columns may follow (cli)


def input_paths(specs: Iterable[str | Path | None]) -> list[Path]:
    """The resolved files and folders a run reads: an .npz, an image folder, a manifest and the images
    it lists, a weights / backbone / embeddings / decisions file (``sample`` and ``None`` name nothing
    on disk)."""
    protected: list[Path] = []
    for spec in specs:
        if spec is None or str(spec) == "" or is_sample_spec(spec):
            continue
        path = Path(spec)
        protected.append(path.resolve())
        if path.suffix.lower() == ".csv" and path.is_file():
            with contextlib.suppress(DataError):  # a bad manifest is reported by the loader, with its line
                protected += manifest_files(path)[0]
    return protected


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of what ``path`` leads to (links followed); None when there is nothing there."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def _inside(path: Path, inputs: list[Path]) -> Path | None:
    """The input that ``path`` (resolved) is, or lies inside; None when it touches none. Compared by
    path and by identity: the path itself and every folder above it against each input's device and
    inode, so a second path to an input (a hard link, a bind mount) is caught as well."""
    for source in inputs:
        if path == source or path.is_relative_to(source):
            return source
    identities = {}
    for source in inputs:
        identity = _identity(source)
        if identity is not None:
            identities.setdefault(identity, source)
    for place in (path, *path.parents):
        identity = _identity(place)
        if identity is not None and identity in identities:
            return identities[identity]
    return None


SQLITE_MAGIC = b"SQLite format 3\x00"
WORKSPACE_SUFFIXES = (".sqlite", ".sqlite-wal", ".sqlite-shm", ".sqlite-journal")  # engine.workspace.SUFFIX


def _is_database(path: Path) -> bool:
    """A workspace database (or its journal): never an output, whatever ``--force`` says."""
    if path.name.lower().endswith(WORKSPACE_SUFFIXES):
        return True
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # never open a FIFO (it would block)
            return False
        with open(path, "rb") as handle:
            return handle.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


# -- which files this tool wrote: a checksum recorded at write time -------------------------------

REGISTRY_LIMIT = 2000  # remembered files; the oldest are forgotten (then replacing one needs --force)


def _registry_path() -> Path:
    """Where the checksums of written files are kept: $INFLUENCE_LENS_STATE_DIR, else the XDG state folder."""
    folder = os.environ.get("INFLUENCE_LENS_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state"), "influence-lens")
    return Path(folder) / "written-files.json"


def _checksum(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def _registry() -> dict[str, str]:
    try:
        values = json.loads(_registry_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def remember_written(path: str | Path) -> None:
    """Record the checksum of a file the tool has just written, so a later run may replace it while it is
    unchanged. Best effort: where the state folder cannot be written, replacing the file needs ``--force``."""
    resolved = Path(path).resolve()
    checksum = _checksum(resolved)
    if checksum is None:
        return
    values = _registry()
    values.pop(str(resolved), None)
    values[str(resolved)] = checksum
    values = dict(list(values.items())[-REGISTRY_LIMIT:])
    registry = _registry_path()
    with contextlib.suppress(OSError, InfluenceLensError):
        registry.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(registry, lambda handle: json.dump(values, handle))


def written_by_us(path: Path) -> bool:
    """Whether ``path`` is a file this tool wrote and nobody has changed since (its recorded checksum)."""
    recorded = _registry().get(str(Path(path).resolve()))
    return recorded is not None and recorded == _checksum(path)


def written_score_table(path: Path) -> bool:
    """Whether ``path`` is a score table ``influence-lens score`` wrote, unchanged since: our header and the
    checksum recorded when it was written (a table annotated with extra columns or edited is not ours)."""
    try:
        with open(path, encoding="utf-8") as handle:
            ours = handle.readline().rstrip("\r\n").startswith(SCORE_TABLE_STARTS)
    except (OSError, UnicodeDecodeError):
        return False
    return ours and written_by_us(path)


def check_output(path: str | Path, inputs: Iterable[str | Path | None], *, force: bool = False,
                 option: str = "--out", ours: Callable[[Path], bool] = written_score_table) -> Path:
    """``path`` resolved, once it is safe to write there later; an :class:`InfluenceLensError` otherwise.

    ``inputs``: the data specs of the run (:func:`input_paths`). ``ours``: whether an existing file was
    written by this tool (then it may be replaced); ``force`` replaces any regular file that is no input.
    """
    out = Path(path)
    if out.is_dir():
        raise InfluenceLensError(f"{out}: {option} is a folder; give a file name such as {out / 'scores.csv'}")
    if not out.parent.is_dir():
        raise InfluenceLensError(f"{out}: the folder {out.parent} does not exist")
    resolved = _outside_inputs(out, inputs, option)
    if _is_database(resolved):
        raise InfluenceLensError(f"{out}: {option} is a workspace database (the review decisions); influence-lens "
                                 "never writes over it: choose another file name")
    if os.path.lexists(resolved):
        try:
            mode = os.stat(resolved).st_mode
        except OSError as exc:
            raise InfluenceLensError(f"{out}: cannot use it as {option} ({exc.strerror or exc})") from None
        if not stat.S_ISREG(mode):
            raise InfluenceLensError(f"{out}: {option} exists and is not a regular file (a FIFO, device or socket); "
                                     "choose a file name")
        if not force and not ours(resolved):
            raise InfluenceLensError(f"{out}: exists and was not written by influence-lens (or was changed since); "
                                     f"choose another {option} or pass --force to replace it")
    if not os.access(resolved.parent, os.W_OK | os.X_OK):
        raise InfluenceLensError(f"{out}: the folder {out.parent} is not writable")
    return resolved


def check_folder(folder: str | Path, inputs: Iterable[str | Path | None], *, option: str = "--workspace") -> Path:
    """A folder the tool creates files in (the workspace folder), resolved: not a file, not an input and
    not inside one (files written into an image folder would become part of the data)."""
    path = Path(folder)
    if os.path.lexists(path) and not path.is_dir():
        raise InfluenceLensError(f"{path}: {option} is a file, not a folder; give a folder (it is created if missing)")
    return _outside_inputs(path, inputs, option)


def _outside_inputs(path: Path, inputs: Iterable[str | Path | None], option: str) -> Path:
    """``path`` resolved (links followed), refused when it is, or lies inside, one of the inputs."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop
        raise InfluenceLensError(f"{path}: cannot use it as {option} ({exc})") from None
    source = _inside(resolved, input_paths(inputs))
    if source is not None:
        raise InfluenceLensError(f"{path}: {option} is, or lies inside, the input {source}; influence-lens never "
                                 "writes over its data: choose a path outside it")
    return resolved


def write_atomically(path: str | Path, write: Callable[[IO], None], *, binary: bool = False) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, flush it to disk, then rename it onto
    ``path``: readers see the old file or the complete new one. :class:`InfluenceLensError` on failure."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) \
                as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        raise InfluenceLensError(f"{path}: cannot write it ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def is_sample_spec(spec: str | Path | None) -> bool:
    """``sample`` or ``sample:SPLIT``, the embedded data: nothing on disk (``samples/x.npz`` is a path)."""
    return spec is not None and (str(spec) == "sample" or str(spec).startswith("sample:"))


def under_root(spec: str | None, root: str | Path | None, *, own: str | Path | None = None) -> str | None:
    """The path to read for ``spec``: with a data root, ``root/spec`` once :func:`check_within_root` has
    passed it (the one check every path a dashboard page reads goes through); as given without a root."""
    if spec is None or root is None or is_sample_spec(spec):
        return spec
    check_within_root([spec], root, own=own)
    return str(Path(root).resolve() / spec)


def check_within_root(specs: Iterable[str | Path | None], root: str | Path | None, *,
                      own: str | Path | None = None) -> None:
    """Refuse a data path outside ``root`` (links resolved), with the same words whether or not it
    exists: a dashboard shared on the network must not read, or reveal, the server's other folders.
    Paths inside ``own`` (the workspace folder: files the tool wrote, e.g. a grown validation set) pass."""
    if root is None:
        return
    root = Path(root).resolve()
    allowed = [root] if own is None else [root, Path(own).resolve()]
    for spec in specs:
        if spec is None or is_sample_spec(spec):
            continue
        try:
            inside = _inside((root / spec).resolve(), allowed) is not None
        except (OSError, ValueError):  # a link loop, a NUL byte: refused like any path outside
            inside = False
        if not inside:
            raise InfluenceLensError(f"{spec}: outside the data root; this dashboard opens data only under its "
                                     "--data-root folder (paths relative to it)")


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as the start of a formula


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy whose text cells cannot run as spreadsheet formulas: a cell starting with ``= + - @`` (or a
    tab / carriage return) gets a leading ``'`` (OWASP, CSV injection); so does one that starts with ``'``
    itself, so that classes ``'=x`` and ``=x`` stay apart (``''=x`` and ``'=x``). Numbers are left as they are;
    :func:`engine.pipeline.read_decisions` reads such a label back without the quote."""
    safe = frame.copy()
    for column in safe.columns:
        if not pd.api.types.is_numeric_dtype(safe[column]):
            safe[column] = [f"'{v}" if isinstance(v, str) and v.startswith((*FORMULA_STARTS, "'")) else v
                            for v in safe[column]]
    return safe
