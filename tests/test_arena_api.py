"""The Arena through the API of a running server: battles and votes from separate clients, the refusals, and the
durability of acknowledged votes across kill -9 of the server."""

import signal
import threading

import pytest
from gradio_client import Client

from studio.arena.votes import default_votes_url, open_store
from tests.conftest import start_app, stop_app

PROMPT = "a red circle on a blue background"


def battle(client, seed=-1):
    battle_id, left, right = client.predict(prompt=PROMPT, seed=seed, api_name="/arena_battle")
    return battle_id


def vote(client, battle_id, choice="left"):
    return client.predict(battle_id=battle_id, choice=choice, api_name="/arena_vote")


def test_votes_refusals_and_durability_across_kill_9(tmp_path):
    data = tmp_path / "data"
    url, server = start_app(["--data-dir", str(data)], tmp_path)
    try:
        visitor, other = Client(url, verbose=False), Client(url, verbose=False)
        acknowledged = []
        for seed, choice in ((1, "left"), (2, "right"), (3, "tie"), (4, "both bad")):
            battle_id = battle(visitor, seed)
            revealed = vote(visitor, battle_id, choice)
            assert revealed.startswith(f"Vote recorded ({choice})") and "**Left:** embedded" in revealed
            acknowledged.append(battle_id)
        pending = battle(visitor, 5)
        with pytest.raises(Exception, match="another visitor"):
            vote(other, pending)  # a battle id seen by someone else is no good to them
        with pytest.raises(Exception, match="Unknown battle"):
            vote(visitor, pending[:-4] + "AAAA")  # a forged id
        with pytest.raises(Exception, match="vote already"):
            vote(visitor, acknowledged[0], "right")  # a second vote, changing the first
        # the same vote sent again (a client's retry) is the vote already recorded, not a second one
        assert vote(visitor, acknowledged[0], "left").startswith("Vote recorded (left)")
        with pytest.raises(Exception, match="Choose one of"):
            vote(visitor, pending, "middle")

        # concurrent voters, each a client of its own: no vote is lost
        def voter(results):
            client = Client(url, verbose=False)
            for _ in range(2):
                battle_id = battle(client)
                vote(client, battle_id, "left")
                results.append(battle_id)

        results = []
        threads = [threading.Thread(target=voter, args=(results,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        acknowledged += results
        assert len(results) == 6
        before = visitor.predict(api_name="/leaderboard")
        server.send_signal(signal.SIGKILL)  # right after the acknowledgements
        server.wait()
    finally:
        stop_app(server)

    stored = {b.id for b in open_store(default_votes_url(data)).voted_battles()}
    assert set(acknowledged) <= stored and len(stored) == len(acknowledged)
    url, server = start_app(["--data-dir", str(data)], tmp_path)
    try:
        after = Client(url, verbose=False).predict(api_name="/leaderboard")
        assert after["data"] == before["data"]  # the same leaderboard after the restart
        assert sum(row[5] for row in after["data"]) == 2 * len(acknowledged)  # every battle counted, both sides
    finally:
        stop_app(server)


def test_submit_sees_each_side_forming_then_the_battle(tmp_path):
    """Client.submit's intermediate outputs: a side's live preview (the left's with the right emptied, then the
    right's), no battle id until both images are made; then the battle, as predict returns it."""
    url, server = start_app(["--data-dir", str(tmp_path / "data")], tmp_path)
    try:
        client = Client(url, verbose=False)

        def unchanged(value):  # gr.skip(), as the client gets it
            return isinstance(value, dict) and value.get("__type__") == "update"

        for _ in range(3):  # an 8-step side may end between two looks (10 a second): another battle then
            job = client.submit(prompt=PROMPT, seed=5, api_name="/arena_battle")
            outputs = list(job)
            battle_id, left, right = job.result()
            assert battle_id and left and right
            for forming_id, forming_left, forming_right in outputs[:-1]:
                assert unchanged(forming_id)
                # the left forming (the right emptied), or the right forming (the left as it was)
                assert (isinstance(forming_left, str) and forming_right is None) or (
                    unchanged(forming_left) and isinstance(forming_right, str)), (forming_left, forming_right)
            if any(isinstance(forming_left, str) for _, forming_left, _ in outputs[:-1]):
                break
        else:
            raise AssertionError("no battle showed its left side forming")
    finally:
        stop_app(server)
