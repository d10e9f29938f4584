"""The review workspace: one SQLite file per dataset holding runs, scores and the decision log.

Why SQLite: a reviewer's hour of decisions must survive a browser refresh, a closed tab, a server
restart or a killed process, and two tabs (or two processes) on one workspace must see each
other's decisions. Every decision is its own transaction in WAL mode; undo appends a row (and
flags the undone one) instead of deleting anything, so the log is the full history. The user's
data files are never written: the workspace lives in its own folder (``workspaces/`` under the
current directory unless another folder is given).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.data import Dataset
from engine.errors import DataError, InfluenceLensError
from engine.pipeline import ACTIONS

SCHEMA_VERSION = 2  # 2: arrays above FILE_ARRAY_BYTES live in .npy files beside the database (a v1 file is upgraded)
DEFAULT_FOLDER = "workspaces"
SUFFIX = ".sqlite"
_SQLITE_HEADER = b"SQLite format 3\x00"
# "database is locked" retries: SQLite's own busy handler waits up to BUSY_TIMEOUT_S per attempt;
# a few attempts with backoff cover a long checkpoint in another process without hanging the app.
BUSY_TIMEOUT_S = 5.0
LOCK_RETRIES = 6
# A per-row array this large (N×D features of a big run) is written to an .npy file in the workspace's
# ``.arrays`` folder and read back memory-mapped: SQLite caps a blob at 1 GB, and a blob is read whole,
# so opening a million-row run would hold every feature row in memory. The row in ``arrays`` names the file.
FILE_ARRAY_BYTES = 16 * 2**20
_FILE_MARKER = b"influence-lens array file\x00"

_SCHEMA = """
CREATE TABLE runs (
    config_hash TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    created TEXT NOT NULL,
    last_used TEXT NOT NULL
);
CREATE TABLE results (
    config_hash TEXT NOT NULL REFERENCES runs(config_hash),
    method TEXT NOT NULL,
    scores BLOB NOT NULL,
    suggested BLOB NOT NULL,
    settings TEXT NOT NULL,
    timings TEXT NOT NULL,
    info TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (config_hash, method)
);
CREATE TABLE arrays (
    config_hash TEXT NOT NULL REFERENCES runs(config_hash),
    name TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (config_hash, name)
);
CREATE TABLE reports (
    config_hash TEXT NOT NULL,
    name TEXT NOT NULL,
    payload TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (config_hash, name)
);
CREATE TABLE decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    batch INTEGER NOT NULL,
    sample_index INTEGER NOT NULL,
    action TEXT NOT NULL,
    new_label INTEGER,
    decided_at TEXT NOT NULL,
    undone INTEGER NOT NULL DEFAULT 0,
    undoes INTEGER REFERENCES decisions(id)
);
CREATE INDEX decisions_by_sample ON decisions(sample_index, id);
"""
# The last decision number applied per browser tab (the gallery numbers its decisions and resends those
# not yet acknowledged): written in the decision's own transaction, so a resent decision is never applied
# twice, even after a server restart. Created when missing: older files gain it, older readers ignore it.
_SENT_TABLE = "CREATE TABLE IF NOT EXISTS sent (client TEXT PRIMARY KEY, seq INTEGER NOT NULL)"
# Gallery thumbnails (engine.thumbnails) per run, row and size: a page of cards reads its own, nothing more.
_THUMBNAIL_TABLE = ("CREATE TABLE IF NOT EXISTS thumbnails (config_hash TEXT NOT NULL, sample_index INTEGER NOT NULL, "
                    "size INTEGER NOT NULL, image BLOB NOT NULL, PRIMARY KEY (config_hash, sample_index, size))")

LOG_COLUMNS = ["id", "batch", "index", "action", "new_label", "decided_at", "undone", "undoes"]
DECISION_COLUMNS = ["index", "action", "new_label", "decided_at"]
CLEANED_COLUMNS = ["index", "original_label", "final_label", "action"]
UNREVIEWED = "unreviewed"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _to_blob(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def _from_blob(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def _array_file_name(config_hash: str, name: str) -> str:
    return f"{config_hash}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}-{hashlib.sha1(name.encode()).hexdigest()[:6]}.npy"


def _claim(con: sqlite3.Connection, client: str, seq: int) -> bool:
    """Inside a write transaction: True (and recorded) when ``seq`` is new for ``client``, False for a resend."""
    row = con.execute("SELECT seq FROM sent WHERE client = ?", (client,)).fetchone()
    if row is not None and int(row[0]) >= seq:
        return False
    con.execute("INSERT INTO sent (client, seq) VALUES (?, ?) ON CONFLICT(client) DO UPDATE SET seq = excluded.seq",
                (client, int(seq)))
    return True


def workspace_name(data_key: str) -> str:
    """A readable, filesystem-safe file stem for a dataset key, unique through a short hash."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", data_key).strip("-.")[-60:] or "data"
    return f"{slug}-{hashlib.sha1(data_key.encode()).hexdigest()[:8]}"


def default_folder(folder: str | Path | None = None) -> Path:
    """``folder`` if given, else ``workspaces/`` under the current directory."""
    return Path(folder) if folder is not None else Path.cwd() / DEFAULT_FOLDER


@dataclass(frozen=True)
class StoredResult:
    """One method's stored output for one run configuration."""

    method: str
    scores: np.ndarray
    suggested_labels: np.ndarray
    settings: dict[str, Any]
    timings: dict[str, float]
    info: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # per-row arrays, e.g. probabilities


class Workspace:
    """One SQLite workspace file. Cheap to construct; every call opens its own connection, so an
    instance can be shared across threads (Streamlit reruns) and the file across processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._check_is_sqlite()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._retrying(self._initialise)

    @classmethod
    def for_data(cls, data_key: str, folder: str | Path | None = None) -> Workspace:
        """The workspace of one dataset (``data_key`` names the labelled data, e.g. with its noise)."""
        return cls(default_folder(folder) / f"{workspace_name(data_key)}{SUFFIX}")

    # -- plumbing ---------------------------------------------------------------------------------

    def _check_is_sqlite(self) -> None:
        folder = self.path.parent
        if not folder.is_dir() and any(p.exists() and not p.is_dir() for p in (folder, *folder.parents)):
            raise InfluenceLensError(f"{folder}: the workspace folder is a file, not a folder")
        if self.path.exists() and not self.path.is_dir() and not self.path.is_file():
            raise InfluenceLensError(f"{self.path}: not a regular file (a FIFO, device or socket), not a workspace")
        if self.path.is_dir():
            raise InfluenceLensError(f"{self.path}: is a folder, not a workspace file")
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as handle:
                if handle.read(len(_SQLITE_HEADER)) != _SQLITE_HEADER:
                    raise InfluenceLensError(f"{self.path}: not a workspace (not an SQLite database); "
                                             "move the file away or choose another workspace folder")

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")  # a decision whose commit returned survives a crash
        return con

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` takes the write lock up front)."""
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        con = self._connect()
        try:
            yield con
        finally:
            con.close()

    def _retrying(self, operation):
        """Run ``operation``, retrying a bounded number of times while another writer holds the lock."""
        for attempt in range(LOCK_RETRIES):
            try:
                return operation()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise InfluenceLensError(f"{self.path}: workspace error ({exc})") from None
                time.sleep(min(0.05 * 2 ** attempt, 1.0))
            except sqlite3.DatabaseError as exc:
                raise InfluenceLensError(f"{self.path}: not a usable workspace database ({exc})") from None
        raise InfluenceLensError(f"{self.path}: the workspace stayed locked by another process; try again")

    def _initialise(self) -> None:
        with self._transaction() as con:
            con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = con.execute("SELECT max(version) FROM schema_version").fetchone()
            version = row[0]
            if version is None:  # executescript() would COMMIT early, so one statement at a time
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    con.execute(statement)
                con.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                con.execute(_SENT_TABLE)
                con.execute(_THUMBNAIL_TABLE)
            elif version > SCHEMA_VERSION:
                raise InfluenceLensError(
                    f"{self.path}: workspace written by a newer influence-lens (schema version {version}, "
                    f"this version reads up to {SCHEMA_VERSION}); upgrade influence-lens to open it")
            else:
                con.execute(_SENT_TABLE)
                con.execute(_THUMBNAIL_TABLE)
                if any(column[1] == "png" for column in con.execute("PRAGMA table_info(thumbnails)")):
                    con.execute("ALTER TABLE thumbnails RENAME COLUMN png TO image")  # named when it held PNGs only
                if version < SCHEMA_VERSION:  # v1 → v2 adds file-backed arrays; nothing stored changes
                    con.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    def schema_version(self) -> int:
        with self._reading() as con:
            return int(con.execute("SELECT max(version) FROM schema_version").fetchone()[0])

    # -- runs and results -------------------------------------------------------------------------

    def save_run(self, config_hash: str, settings: dict[str, Any]) -> None:
        """Record a run configuration (idempotent); marks it as the most recently used."""
        def write():
            now = _now()
            with self._transaction() as con:
                con.execute("INSERT INTO runs (config_hash, settings, created, last_used) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT(config_hash) DO UPDATE SET last_used = excluded.last_used",
                            (config_hash, json.dumps(settings, sort_keys=True, default=str), now, now))
        self._retrying(write)

    def runs(self) -> pd.DataFrame:
        """Every run, most recently used first: ``config_hash, settings (dict), created, last_used, methods``."""
        def read():
            with self._reading() as con:
                rows = con.execute("SELECT r.config_hash, r.settings, r.created, r.last_used, "
                                   "(SELECT group_concat(method, ',') FROM results s "
                                   " WHERE s.config_hash = r.config_hash) "
                                   "FROM runs r ORDER BY r.last_used DESC").fetchall()
            return pd.DataFrame([(h, json.loads(s), c, u, sorted((m or "").split(",")) if m else [])
                                 for h, s, c, u, m in rows],
                                columns=["config_hash", "settings", "created", "last_used", "methods"])
        return self._retrying(read)

    def _decoding(self, read, config_hash: str):
        """``read`` through :meth:`_retrying`; a stored array or report that no longer decodes (a damaged
        blob) is a :class:`DataError` naming the file and the run, not a traceback."""
        try:
            return self._retrying(read)
        except (ValueError, EOFError, OSError) as exc:  # np.load's and json's own errors on damaged bytes
            raise DataError(f"{self.path}: the stored results of run {config_hash} are damaged "
                            f"({exc.__class__.__name__}: {str(exc)[:200]}); move the file away to start afresh "
                            "(the decisions in it are kept there)") from None

    def save_result(self, config_hash: str, result) -> None:
        """Store one method's ``ScoreResult`` (scores and suggested labels as ``.npy`` blobs, its per-row
        arrays in the run's arrays as ``method/name``), in one transaction."""
        rows = [(config_hash, f"{result.method}/{name}", self._stored_form(config_hash, f"{result.method}/{name}", a))
                for name, a in result.arrays.items()]

        def write():
            with self._transaction() as con:
                con.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (config_hash, result.method, _to_blob(result.scores), _to_blob(result.suggested_labels),
                             json.dumps(result.settings, default=str), json.dumps(result.timings),
                             json.dumps(result.info, default=str), _now()))
                con.executemany("INSERT OR REPLACE INTO arrays VALUES (?, ?, ?)", rows)
        self._retrying(write)

    def results(self, config_hash: str) -> dict[str, StoredResult]:
        """Every stored method result of a run, by method name, with its per-row arrays."""
        def read():
            with self._reading() as con:
                rows = con.execute("SELECT method, scores, suggested, settings, timings, info FROM results "
                                   "WHERE config_hash = ? ORDER BY created", (config_hash,)).fetchall()
                named = con.execute("SELECT name, data FROM arrays WHERE config_hash = ? AND name LIKE '%/%'",
                                    (config_hash,)).fetchall()
            per_method: dict[str, dict[str, np.ndarray]] = {}
            for name, data in named:
                method, _, array = name.partition("/")
                per_method.setdefault(method, {})[array] = self._array_from(data)
            return {m: StoredResult(m, _from_blob(s), _from_blob(g), json.loads(st), json.loads(t), json.loads(i),
                                    per_method.get(m, {}))
                    for m, s, g, st, t, i in rows}
        return self._decoding(read, config_hash)

    def methods(self, config_hash: str) -> list[str]:
        """Names of the methods stored for a run, oldest first (cheap: no arrays read)."""
        def read():
            with self._reading() as con:
                return [m for (m,) in con.execute("SELECT method FROM results WHERE config_hash = ? ORDER BY created",
                                                  (config_hash,))]
        return self._retrying(read)

    def save_arrays(self, config_hash: str, arrays: dict[str, np.ndarray]) -> None:
        """Store named arrays of a run (model outputs the dashboard shows without the model)."""
        rows = [(config_hash, name, self._stored_form(config_hash, name, a)) for name, a in arrays.items()]

        def write():
            with self._transaction() as con:
                con.executemany("INSERT OR REPLACE INTO arrays VALUES (?, ?, ?)", rows)
        self._retrying(write)

    def arrays(self, config_hash: str) -> dict[str, np.ndarray]:
        """A run's stored arrays; those kept in files are read-only memory maps (nothing read until used)."""
        def read():
            with self._reading() as con:
                rows = con.execute("SELECT name, data FROM arrays WHERE config_hash = ?", (config_hash,)).fetchall()
            return {name: self._array_from(data) for name, data in rows}
        return self._decoding(read, config_hash)

    @property
    def array_folder(self) -> Path:
        """Where arrays above :data:`FILE_ARRAY_BYTES` are kept: ``<workspace>.arrays`` beside the file."""
        return self.path.with_suffix(".arrays")

    def _stored_form(self, config_hash: str, name: str, array: np.ndarray) -> bytes:
        """What the ``arrays`` row holds: the ``.npy`` bytes, or for a large array the name of the ``.npy``
        file it was written to (whole, synced and renamed into place before the row is committed, so a
        crash leaves either the old row or a complete file)."""
        array = np.asarray(array)
        if array.nbytes < FILE_ARRAY_BYTES:
            return _to_blob(array)
        self.array_folder.mkdir(exist_ok=True)
        file = self.array_folder / _array_file_name(config_hash, name)
        partial = file.with_name(file.name + ".partial")
        stored = np.lib.format.open_memmap(partial, mode="w+", dtype=array.dtype, shape=array.shape)
        for lo in range(0, len(array), 65536):  # in slices: a memory-mapped source is never read whole
            stored[lo:lo + 65536] = array[lo:lo + 65536]
        stored.flush()
        del stored
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, file)
        return _FILE_MARKER + json.dumps({"file": file.name, "dtype": array.dtype.str,
                                          "shape": list(array.shape)}).encode()

    def _array_from(self, data: bytes) -> np.ndarray:
        if not data.startswith(_FILE_MARKER):
            return _from_blob(data)
        meta = json.loads(data[len(_FILE_MARKER):])
        file = self.array_folder / Path(meta["file"]).name
        try:
            array = np.load(file, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise DataError(f"{file}: a stored array of this workspace is missing; score the run again "
                            "(the decisions are kept)") from None
        if array.dtype.str != meta["dtype"] or list(array.shape) != meta["shape"]:
            raise ValueError(f"{file} holds {array.dtype} {array.shape}, not {meta['dtype']} {meta['shape']}")
        return array

    def save_report(self, config_hash: str, name: str, payload: dict[str, Any]) -> None:
        """Store a JSON report of a run (a retrain comparison, a cleaning curve), replacing the last."""
        def write():
            with self._transaction() as con:
                con.execute("INSERT OR REPLACE INTO reports VALUES (?, ?, ?, ?)",
                            (config_hash, name, json.dumps(payload, default=str), _now()))
        self._retrying(write)

    def report(self, config_hash: str, name: str) -> dict[str, Any] | None:
        def read():
            with self._reading() as con:
                row = con.execute("SELECT payload FROM reports WHERE config_hash = ? AND name = ?",
                                  (config_hash, name)).fetchone()
            return None if row is None else json.loads(row[0])
        return self._decoding(read, config_hash)

    def thumbnails(self, config_hash: str, indices: Sequence[int], size: int) -> dict[int, bytes]:
        """The stored thumbnails of these sample indices (those not stored are absent)."""
        def read():
            with self._reading() as con:
                found = {}
                for lo in range(0, len(indices), 500):  # SQLite's limit on bound parameters
                    part = [int(i) for i in indices[lo:lo + 500]]
                    found.update(con.execute(
                        f"SELECT sample_index, image FROM thumbnails WHERE config_hash = ? AND size = ? "
                        f"AND sample_index IN ({','.join('?' * len(part))})", (config_hash, int(size), *part)))
                return found
        return self._retrying(read)

    def save_thumbnails(self, config_hash: str, size: int, images: dict[int, bytes]) -> None:
        def write():
            with self._transaction() as con:
                con.executemany("INSERT OR REPLACE INTO thumbnails VALUES (?, ?, ?, ?)",
                                [(config_hash, int(i), int(size), image) for i, image in images.items()])
        self._retrying(write)

    # -- decisions --------------------------------------------------------------------------------

    def decide(self, indices, action: str, new_label: int | Sequence[int] | None = None, *,
               sent: tuple[str, int] | None = None) -> int | None:
        """Record one decision for each sample index (one transaction, one batch); returns the batch id.

        ``action`` is ``relabel`` (``new_label`` required: one label for all, or one per index, so a
        bulk "accept the suggestions" is still one batch and one undo), ``drop`` or ``keep``.
        ``sent`` = (client, number): a numbered decision from a browser tab; one numbered at or below the
        client's last applied number is a resend and is skipped (returns None).
        """
        if action not in ACTIONS:
            raise InfluenceLensError(f"unknown action {action!r}; valid: {', '.join(ACTIONS)}")
        indices = [int(i) for i in np.atleast_1d(np.asarray(indices, dtype=np.int64))]
        if not indices:
            raise InfluenceLensError("no samples selected")
        if action == "relabel":
            if new_label is None:
                raise InfluenceLensError("a relabel decision needs the new label")
            labels = np.atleast_1d(np.asarray(new_label, dtype=np.int64))
            labels = np.repeat(labels, len(indices)) if len(labels) == 1 else labels
            if len(labels) != len(indices):
                raise InfluenceLensError(f"{len(labels)} new labels for {len(indices)} samples")
            if (labels < 0).any():
                raise InfluenceLensError("a relabel decision needs the new label")
            labels = [int(label) for label in labels]
        else:
            labels = [None] * len(indices)

        def write():
            with self._transaction() as con:
                if sent is not None and not _claim(con, *sent):
                    return None
                batch = con.execute("SELECT coalesce(max(batch), 0) + 1 FROM decisions").fetchone()[0]
                now = _now()
                con.executemany("INSERT INTO decisions (batch, sample_index, action, new_label, decided_at) "
                                "VALUES (?, ?, ?, ?, ?)",
                                [(batch, i, action, label, now) for i, label in zip(indices, labels, strict=True)])
                return int(batch)
        return self._retrying(write)

    def last_sent(self, client: str) -> int:
        """The number of ``client``'s last applied decision (0 before the first)."""
        def read():
            with self._reading() as con:
                row = con.execute("SELECT seq FROM sent WHERE client = ?", (client,)).fetchone()
                return 0 if row is None else int(row[0])
        return self._retrying(read)

    def undo(self, *, sent: tuple[str, int] | None = None) -> pd.DataFrame:
        """Undo the most recent batch of decisions still in force; returns the undone rows (empty if none).

        The undone rows are flagged and an ``undo`` row per sample is appended: nothing is deleted.
        ``sent`` as in :meth:`decide`: a resent undo undoes nothing.
        """
        def write():
            with self._transaction() as con:
                if sent is not None and not _claim(con, *sent):
                    return []
                row = con.execute("SELECT max(batch) FROM decisions WHERE action != 'undo' AND undone = 0").fetchone()
                if row[0] is None:
                    return []
                undone = con.execute("SELECT id, sample_index FROM decisions WHERE batch = ? AND action != 'undo' "
                                     "AND undone = 0", (row[0],)).fetchall()
                batch = con.execute("SELECT max(batch) + 1 FROM decisions").fetchone()[0]
                now = _now()
                con.execute("UPDATE decisions SET undone = 1 WHERE batch = ? AND action != 'undo'", (row[0],))
                con.executemany("INSERT INTO decisions (batch, sample_index, action, decided_at, undoes) "
                                "VALUES (?, ?, 'undo', ?, ?)", [(batch, i, now, d) for d, i in undone])
                return [i for _, i in undone]
        undone = self._retrying(write)
        current = self.decisions()
        return pd.DataFrame({"index": undone}).merge(current, on="index", how="left")

    def decisions(self) -> pd.DataFrame:
        """The decision in force per sample (latest not undone): ``index, action, new_label, decided_at``.

        ``new_label`` is -1 unless the action is ``relabel``; the frame feeds
        :func:`engine.pipeline.apply_decisions` directly.
        """
        def read():
            with self._reading() as con:
                return con.execute(
                    "SELECT sample_index, action, coalesce(new_label, -1), decided_at FROM decisions d "
                    "WHERE id = (SELECT max(id) FROM decisions e WHERE e.sample_index = d.sample_index "
                    "AND e.action != 'undo' AND e.undone = 0) ORDER BY sample_index").fetchall()
        frame = pd.DataFrame(self._retrying(read), columns=DECISION_COLUMNS)
        return frame.astype({"index": np.int64, "new_label": np.int64})

    def decision_log(self) -> pd.DataFrame:
        """Every row ever written, oldest first (``LOG_COLUMNS``)."""
        def read():
            with self._reading() as con:
                return con.execute("SELECT id, batch, sample_index, action, new_label, decided_at, undone, undoes "
                                   "FROM decisions ORDER BY id").fetchall()
        frame = pd.DataFrame(self._retrying(read), columns=LOG_COLUMNS)
        return frame.astype({"new_label": "Int64", "undoes": "Int64"})

    # -- exports ----------------------------------------------------------------------------------

    def cleaned_labels(self, dataset: Dataset) -> pd.DataFrame:
        """``index,original_label,final_label,action`` for every row of ``dataset`` (class names), with
        ``path`` after ``index`` when the data came from files.

        Dropped rows have an empty ``final_label``; rows without a decision are ``unreviewed``.
        """
        names = np.asarray(dataset.class_names, dtype=object)
        current = self.decisions().set_index("index")
        current = current[current.index.isin(dataset.index)]
        action = pd.Series(UNREVIEWED, index=dataset.index, dtype=object)
        action[current.index] = current["action"]
        final = names[dataset.labels].copy()
        relabel = current[current["action"] == "relabel"]
        positions = pd.Index(dataset.index).get_indexer(relabel.index)
        final[positions] = names[relabel["new_label"].to_numpy()]
        final[(action == "drop").to_numpy()] = ""
        frame = pd.DataFrame({"index": dataset.index, "original_label": names[dataset.labels],
                              "final_label": final, "action": action.to_numpy()}, columns=CLEANED_COLUMNS)
        if dataset.paths is not None:  # each row's file beside its index
            frame.insert(1, "path", list(dataset.paths))
        return frame

    def decision_log_export(self, class_names: tuple[str, ...] | None = None) -> pd.DataFrame:
        """The full log for a CSV, with ``new_label`` as a class name when ``class_names`` is given."""
        log = self.decision_log()
        if class_names is not None:
            log["new_label"] = [class_names[int(v)] if pd.notna(v) else "" for v in log["new_label"]]
        return log
