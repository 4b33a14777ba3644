"""The Arena's vote store on SQLite (WAL, synchronous=FULL) and on a real PostgreSQL server: one vote per battle,
concurrent voters lose nothing, and an acknowledged vote survives kill -9 of the process that wrote it."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from studio.arena.votes import SQLiteStore, StoredBattle, open_store
from tests.conftest import ROOT


def battle(index: int) -> StoredBattle:
    return StoredBattle(f"battle-{index}", "a red circle on a blue background", 7, "embedded 20 steps",
                        {"steps": 20}, "embedded 8 steps", {"steps": 8}, 80.0 + index % 3, 81.0)


def exercise(store):
    store.add_battle(battle(1))
    store.add_battle(battle(2))
    assert store.vote("battle-1", "left") is True
    assert store.vote("battle-1", "right") is False  # one vote per battle
    assert store.vote("nope", "left") is False
    with pytest.raises(ValueError, match="unknown choice"):
        store.vote("battle-2", "maybe")
    assert store.battle("battle-1").choice == "left" and store.battle("battle-2").choice is None
    assert store.battle("battle-1").left_settings == {"steps": 20}
    assert [b.id for b in store.voted_battles()] == ["battle-1"]

    # 8 threads vote on 200 battles, two threads per battle: every battle gets exactly one vote, none is lost
    for index in range(100, 300):
        store.add_battle(battle(index))
    recorded = []

    def voter(offset):
        for index in range(100 + offset % 4, 300, 4):
            if store.vote(f"battle-{index}", "tie" if offset < 4 else "both bad"):
                recorded.append(index)

    threads = [threading.Thread(target=voter, args=(offset,)) for offset in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(recorded) == list(range(100, 300))
    assert len(store.voted_battles()) == 201


def test_sqlite_store(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'data' / 'arena.sqlite3'}")
    assert isinstance(store, SQLiteStore)
    assert store._connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    exercise(store)
    store.close()
    with pytest.raises(ValueError, match="Unsupported votes database"):
        open_store("mysql://x")


WRITER = """
import sys
from studio.arena.votes import open_store, StoredBattle
store = open_store(sys.argv[1])
for index in range(10_000):
    battle_id = f"b{index}"
    store.add_battle(StoredBattle(battle_id, "p", index, "a", {}, "b", {}))
    if store.vote(battle_id, "left"):
        print(battle_id, flush=True)  # the acknowledgement: only after the commit returned
"""


def test_an_acknowledged_vote_survives_kill_9(tmp_path):
    path = tmp_path / "arena.sqlite3"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    acknowledged = []
    for line in writer.stdout:
        acknowledged.append(line.strip())
        if len(acknowledged) == 50:
            break
    writer.send_signal(signal.SIGKILL)  # in the middle of its next transactions
    writer.wait()
    acknowledged += [line.strip() for line in writer.stdout]  # any acknowledged before the kill landed
    store = open_store(path)
    stored = {b.id for b in store.voted_battles()}
    assert set(acknowledged) <= stored, set(acknowledged) - stored
    assert len(acknowledged) >= 50


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A PostgreSQL server of our own (Debian's postgresql), on a free port and a socket folder of its own."""
    # not under pytest's folder: it is private to root, and the server runs as the postgres user
    folder = Path(tempfile.mkdtemp(prefix="studio-postgres-"))
    folder.chmod(0o755)
    data, sockets = folder / "data", folder / "sockets"
    sockets.mkdir()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(folder, "postgres")
        shutil.chown(sockets, "postgres")
    made = subprocess.run([*as_postgres, "initdb", "-D", str(data), "-U", "arena", "--auth=trust"],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    port = free_port()
    subprocess.run([*as_postgres, "pg_ctl", "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                    f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1", "start"], check=True,
                   capture_output=True)
    try:
        yield f"postgresql://arena@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, "pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.postgresql  # skipped without initdb and pg_ctl, except in CI (tests/system_tools.py)
def test_postgres_store(postgres):
    store = open_store(postgres)
    exercise(store)
    store.close()
    again = open_store(postgres)  # the schema is there already; the votes too
    assert len(again.voted_battles()) == 201
    again.close()


@pytest.mark.postgresql  # skipped without initdb and pg_ctl, except in CI (tests/system_tools.py)
def test_postgres_acknowledged_vote_survives_kill_9(postgres):
    with open_store(postgres)._connection as connection:  # a table of its own for this test
        connection.execute("DROP TABLE IF EXISTS battles")
        connection.commit()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, postgres], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    acknowledged = []
    for line in writer.stdout:
        acknowledged.append(line.strip())
        if len(acknowledged) == 30:
            break
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    acknowledged += [line.strip() for line in writer.stdout]
    time.sleep(0.2)
    stored = {b.id for b in open_store(postgres).voted_battles()}
    assert set(acknowledged) <= stored


def test_a_database_from_before_battles_had_owners_is_upgraded(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE battles (id TEXT PRIMARY KEY, created REAL NOT NULL, prompt TEXT NOT NULL, seed INTEGER "
                "NOT NULL, left_name TEXT NOT NULL, left_settings TEXT NOT NULL, right_name TEXT NOT NULL, "
                "right_settings TEXT NOT NULL, clip_left REAL, clip_right REAL, choice TEXT, voted REAL)")
    old.execute("INSERT INTO battles VALUES ('b0', 0, 'p', 1, 'a', '{}', 'b', '{}', NULL, NULL, 'left', 1)")
    old.commit()
    old.close()
    store = open_store(path)
    assert [b.id for b in store.voted_battles()] == ["b0"]  # the old vote is kept
    store.add_battle(battle(1))
    assert store.vote("battle-1", "right", owner="") is True
    store.add_battle(battle(1))  # the same insert again (a retry): nothing changes, no error
    assert store.battle("battle-1").choice == "right"
