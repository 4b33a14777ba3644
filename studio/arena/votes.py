"""Where the Arena keeps its battles and votes: SQLite by default, PostgreSQL for a Space with several replicas.

A vote is acknowledged only once its transaction is durable: SQLite in WAL mode with synchronous=FULL (the commit
returns after the log is fsynced), PostgreSQL with synchronous_commit on. A battle is stored when it is made
(prompt, seed, both contestants and their settings, the two images' CLIP scores, and the owner: a SHA-256 of the
random session id that started it, so that only that session can vote, whichever replica or restart takes the
vote); its vote fills it in once: `UPDATE … WHERE id = ? AND owner = ? AND choice IS NULL`. Nothing else about the
visitor is stored.

    store = open_store("sqlite:///data/arena.sqlite3")      # or a plain path
    store = open_store("postgresql://user:pass@host/arena")
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from studio.arena.leaderboard import CHOICES, Battle

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS battles (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    left_name TEXT NOT NULL,
    left_settings TEXT NOT NULL,
    right_name TEXT NOT NULL,
    right_settings TEXT NOT NULL,
    clip_left REAL,
    clip_right REAL,
    owner TEXT NOT NULL DEFAULT '',
    choice TEXT,
    voted REAL
)
"""
POSTGRES_SCHEMA = SQLITE_SCHEMA.replace("REAL", "DOUBLE PRECISION").replace("INTEGER", "BIGINT")


@dataclass(frozen=True)
class StoredBattle:
    id: str
    prompt: str
    seed: int
    left_name: str
    left_settings: dict
    right_name: str
    right_settings: dict
    clip_left: float | None = None
    clip_right: float | None = None
    choice: str | None = None
    owner: str = ""  # owner_of(session) of the session that started it

    def as_battle(self) -> Battle:
        return Battle(self.left_name, self.right_name, self.choice, self.clip_left, self.clip_right)


class VoteStore(ABC):
    """The operations the Arena needs; each is one transaction."""

    placeholder = "?"

    def add_battle(self, battle: StoredBattle) -> None:
        self._execute(
            # ON CONFLICT: ids are random, so a conflict is this insert again (a retry after an unclear commit)
            f"INSERT INTO battles (id, created, prompt, seed, left_name, left_settings, right_name, right_settings, "
            f"clip_left, clip_right, owner) VALUES ({', '.join([self.placeholder] * 11)}) ON CONFLICT (id) DO NOTHING",
            (battle.id, time.time(), battle.prompt, battle.seed, battle.left_name, json.dumps(battle.left_settings),
             battle.right_name, json.dumps(battle.right_settings), battle.clip_left, battle.clip_right, battle.owner))

    def vote(self, battle_id: str, choice: str, owner: str = "") -> bool:
        """Record the choice, durably, once, if `owner` started the battle: True if this call recorded it; False if
        the battle is unknown, someone else's or voted on already (`battle()` tells which)."""
        if choice not in CHOICES:
            raise ValueError(f"unknown choice {choice!r}")
        p = self.placeholder
        return self._execute(f"UPDATE battles SET choice = {p}, voted = {p} WHERE id = {p} AND owner = {p} "
                             f"AND choice IS NULL", (choice, time.time(), battle_id, owner)) == 1

    def battle(self, battle_id: str) -> StoredBattle | None:
        rows = self._query(f"SELECT id, prompt, seed, left_name, left_settings, right_name, right_settings, clip_left, "
                           f"clip_right, choice, owner FROM battles WHERE id = {self.placeholder}", (battle_id,))
        return _stored(rows[0]) if rows else None

    def voted_battles(self) -> list[StoredBattle]:
        """Every battle with a vote, oldest vote first."""
        return [_stored(row) for row in self._query(
            "SELECT id, prompt, seed, left_name, left_settings, right_name, right_settings, clip_left, clip_right, "
            "choice, owner FROM battles WHERE choice IS NOT NULL ORDER BY voted, id", ())]

    def vote_count(self) -> int:
        """How many battles have a vote (cheap: the leaderboard is refitted only when it changes)."""
        return int(self._query("SELECT COUNT(*) FROM battles WHERE choice IS NOT NULL", ())[0][0])

    @abstractmethod
    def _execute(self, sql: str, parameters: tuple) -> int:
        """Run one statement in its own transaction, committed before returning; the rows it changed."""

    @abstractmethod
    def _query(self, sql: str, parameters: tuple) -> list[tuple]:
        """The rows of one query."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection."""


def _stored(row: tuple) -> StoredBattle:
    (battle_id, prompt, seed, left_name, left_settings, right_name, right_settings, clip_left, clip_right,
     choice, owner) = row
    return StoredBattle(battle_id, prompt, int(seed), left_name, json.loads(left_settings), right_name,
                        json.loads(right_settings), clip_left, clip_right, choice, owner)


def owner_of(session: str) -> str:
    """What is stored of a session: a SHA-256 of gradio's random session id (not the visitor)."""
    return hashlib.sha256(session.encode()).hexdigest()


class SQLiteStore(VoteStore):
    """One connection shared by the server's threads (one statement at a time); WAL so that reading the
    leaderboard does not wait for a vote."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        mode = self._connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite could not use WAL mode (got {mode}); is it on a network drive?")
        self._connection.execute("PRAGMA synchronous=FULL")  # a commit returns after the log reached the disk
        self._connection.execute("BEGIN IMMEDIATE")
        self._connection.execute(SQLITE_SCHEMA)
        columns = {row[1] for row in self._connection.execute("PRAGMA table_info(battles)")}
        if "owner" not in columns:  # a file from before battles had owners
            self._connection.execute("ALTER TABLE battles ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
        self._connection.execute("COMMIT")

    def _execute(self, sql: str, parameters: tuple) -> int:
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                count = self._connection.execute(sql, parameters).rowcount
                self._connection.execute("COMMIT")
            except BaseException:
                if self._connection.in_transaction:  # a failed COMMIT (e.g. busy) leaves it open
                    self._connection.execute("ROLLBACK")
                raise
            return count

    def _query(self, sql: str, parameters: tuple) -> list[tuple]:
        with self._lock:
            return self._connection.execute(sql, parameters).fetchall()

    def close(self) -> None:
        with self._lock:
            self._connection.close()


class PostgresStore(VoteStore):
    """psycopg 3, one connection under a lock (a Space's vote rate needs no pool), in autocommit mode with explicit
    transactions; synchronous_commit is set on for this connection, whatever the server's default. A broken
    connection (a server restart, an idle timeout) is opened again once before giving up."""

    placeholder = "%s"

    def __init__(self, url: str):
        self.url = url
        self._lock = threading.Lock()
        self._connection = self._connect()
        with self._connection.transaction():
            # replicas starting together must not race on CREATE TABLE IF NOT EXISTS
            self._connection.execute("SELECT pg_advisory_xact_lock(724518)")
            self._connection.execute(POSTGRES_SCHEMA)
            self._connection.execute("ALTER TABLE battles ADD COLUMN IF NOT EXISTS owner TEXT NOT NULL DEFAULT ''")

    def _connect(self):
        import psycopg

        connection = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        connection.execute("SET synchronous_commit = on")
        return connection

    def _run(self, work):
        import psycopg

        with self._lock:
            for attempt in (1, 2):
                try:
                    with self._connection.transaction():  # committed (and durable) when the block ends
                        return work(self._connection)
                except psycopg.OperationalError:
                    if attempt == 2:
                        raise
                    self._connection.close()
                    self._connection = self._connect()

    def _execute(self, sql: str, parameters: tuple) -> int:
        return self._run(lambda connection: connection.execute(sql, parameters).rowcount)

    def _query(self, sql: str, parameters: tuple) -> list[tuple]:
        return self._run(lambda connection: connection.execute(sql, parameters).fetchall())

    def close(self) -> None:
        with self._lock:
            self._connection.close()


VOTES_FILE = "arena-votes.sqlite3"


def default_votes_url(data_dir: str | Path) -> str:
    """The SQLite file in the server's --data-dir (a Space's persistent storage is /data)."""
    return f"sqlite:///{Path(data_dir) / VOTES_FILE}"


def open_store(url: str | Path) -> VoteStore:
    """A store from a database URL: `sqlite:///path`, a plain file path, or `postgresql://…`."""
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresStore(text)
    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///"):]
    elif "://" in text:
        raise ValueError(f"Unsupported votes database {text!r}: use a file path, sqlite:///path or postgresql://…")
    return SQLiteStore(text)
