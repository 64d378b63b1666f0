"""Jobs and their events in SQLite (``STATE_DIR/jobs.db``): the server's memory across restarts.

Standard library ``sqlite3`` in WAL mode (readers never wait for the writer, a crash loses at most
the last transaction). One connection shared under a lock: the writes are small and the job thread
and the HTTP handlers take turns in microseconds. Events keep their JSON text as sent, so a stream
replays exactly what a live client saw.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["JOB_STATES", "TERMINAL_STATES", "JobStore"]

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "interrupted"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT,
    kind TEXT NOT NULL,
    command TEXT NOT NULL,
    args TEXT NOT NULL,
    cwd TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    restarts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    metrics TEXT NOT NULL DEFAULT '{}',
    artifacts TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    exit_code INTEGER
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, id);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
"""

_JSON_FIELDS = ("args", "metrics", "artifacts", "error")
_COLUMNS = (
    "id name kind command args cwd state attempt restarts created_at started_at finished_at "
    "metrics artifacts error exit_code"
).split()


class JobStore:
    """Jobs (rows of dicts, JSON fields decoded) and events (``(id, type, json_text)``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # check_same_thread=False: the lock below serialises every use across threads.
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, fast commits
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- jobs -------------------------------------------------------------------------------------
    def add_job(
        self, *, name: str | None, kind: str, command: str, args: list[str], cwd: str, restarts: int
    ) -> dict[str, Any]:
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO jobs (name, kind, command, args, cwd, state, restarts, created_at) "
                "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)",
                (name, kind, command, json.dumps(args), cwd, restarts, time.time()),
            )
            job_id = cursor.lastrowid
        job = self.job(int(job_id or 0))
        assert job is not None
        return job

    def update(self, job_id: int, **fields: Any) -> None:
        assert set(fields) <= set(_COLUMNS) - {"id"}, fields
        values = [json.dumps(v) if k in _JSON_FIELDS and v is not None else v for k, v in fields.items()]
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values, job_id))

    def job(self, job_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def jobs(self, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first."""
        query = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
        params: tuple[Any, ...] = ()
        if state is not None:
            query += " WHERE state = ?"
            params = (state,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id DESC LIMIT ?", (*params, limit)).fetchall()
        return [_job(row) for row in rows]

    def ids_in_state(self, state: str) -> list[int]:
        """Oldest first: the order queued jobs run in."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE state = ? ORDER BY id", (state,)).fetchall()
        return [int(row[0]) for row in rows]

    # --- events -----------------------------------------------------------------------------------
    def add_event(self, job_id: int, kind: str, fields: dict[str, Any]) -> tuple[int, str]:
        """Store one event; returns its id and the JSON text that streams carry (the id travels
        beside it, as the SSE ``id:`` line)."""
        text = json.dumps({"type": kind, "job_id": job_id, "time": time.time(), **fields})
        with self._lock:
            cursor = self._db.execute("INSERT INTO events (job_id, type, data) VALUES (?, ?, ?)", (job_id, kind, text))
        return int(cursor.lastrowid or 0), text

    def events(self, job_id: int, after: int | None = None, limit: int = 500) -> list[tuple[int, str, str]]:
        """Events of ``job_id`` after event id ``after`` (all with None), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, type, data FROM events WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?",
                (job_id, after if after is not None else 0, limit),
            ).fetchall()
        return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]


def _job(row: tuple[Any, ...]) -> dict[str, Any]:
    job = dict(zip(_COLUMNS, row))
    for name in _JSON_FIELDS:
        if job[name] is not None:
            job[name] = json.loads(job[name])
    return job
