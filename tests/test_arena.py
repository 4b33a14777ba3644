"""The Arena engine on the embedded model: hidden contestants with one seed, durable votes, refusals with messages,
rate limits, and the leaderboard from the store."""

import pytest

from studio.arena.battles import Arena, Contestant, load_contestants
from studio.arena.votes import open_store
from studio.core.errors import InvalidRequest
from studio.core.sessions import RateLimiter
from studio.models.presets import load_presets
from studio.tasks.engines import local_engines


@pytest.fixture
def arena(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as here, with an empty cache: the Hub preset cannot run
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    text_to_image = local_engines(load_presets()).text_to_image
    contestants = [Contestant("fast", "embedded", "Euler", 4, 3.0), Contestant("slow", "embedded", "Euler", 12, 3.0),
                   Contestant("hub", "stable-diffusion-1.5", "Euler", 20, 7.0),
                   Contestant("bad", "embedded", "Nope", 20, 3.0)]
    return Arena(text_to_image, open_store(tmp_path / "arena.sqlite3"), contestants,
                 battle_limit=RateLimiter(3), vote_limit=RateLimiter(3))


def test_the_default_contestants_file_lists_embedded_and_hub_configurations():
    contestants = load_contestants()
    presets = load_presets()
    assert sum(c.preset == "embedded" for c in contestants) >= 3
    assert any(c.preset != "embedded" for c in contestants)
    assert all(c.preset in presets for c in contestants), [c.preset for c in contestants if c.preset not in presets]


def test_every_default_contestants_settings_pass_its_presets_checks(arena):
    """SD 3.5 and FLUX.1 contestants too: their samplers are the flow ones, their CFG theirs."""
    contestants = load_contestants()
    assert {"sd3.5-medium", "sd3.5-large-turbo", "flux.1-schnell", "flux.1-dev"} <= {c.preset for c in contestants}
    for contestant in contestants:
        request = arena._request(contestant, "a red circle", seed=1)
        preset = arena.text_to_image.presets.get(contestant.preset)
        assert arena.text_to_image.check(request, preset) == {}, contestant.name


def test_only_contestants_that_can_run_here_are_drawn(arena):
    # offline without its files the Hub preset is not drawn; nor is a contestant with an unknown sampler
    assert [c.name for c in arena.contestants] == ["fast", "slow"]


def test_a_battle_a_vote_and_the_refusals(arena):
    battle = arena.battle("visitor", "a red circle on a blue background", seed=11)
    assert battle.seed == 11 and battle.left.size == battle.right.size == (64, 64)
    assert len(battle.battle_id) >= 32
    with pytest.raises(InvalidRequest, match="another visitor"):
        arena.vote("someone else", battle.battle_id, "left")
    with pytest.raises(InvalidRequest, match="Unknown battle"):
        arena.vote("visitor", "forged-" + battle.battle_id[7:], "left")
    with pytest.raises(InvalidRequest, match="Choose one of"):
        arena.vote("visitor", battle.battle_id, "middle")
    reveal = arena.vote("visitor", battle.battle_id, "left")
    stored = arena.store.battle(battle.battle_id)
    assert {reveal.left, reveal.right} <= {c.name for c in arena.contestants} and reveal.left != reveal.right
    assert stored.choice == "left" and stored.seed == 11 and stored.prompt == "a red circle on a blue background"
    assert stored.left_settings["steps"] in (4, 12)
    with pytest.raises(InvalidRequest, match="vote already"):  # the vote limit (3) is not reached yet
        arena.vote("visitor", battle.battle_id, "right")
    board = arena.leaderboard()
    assert {s.name for s in board.standings} >= {"fast", "slow"}
    winner = next(s for s in board.standings if s.name == reveal.left)
    assert winner.wins == 1 and winner.battles == 1


def test_a_prompt_with_a_lora_tag_is_refused_before_any_contestant_is_drawn(arena):
    with pytest.raises(InvalidRequest, match="take the <lora:…> tags out"):
        arena.plan("lora visitor", "a red circle <lora:anything:0.8> on a blue background", seed=1)


def test_battles_are_rate_limited_per_session(arena):
    for _ in range(3):
        arena.battle("eager", "a red circle on a blue background")
    with pytest.raises(InvalidRequest, match="Try again in"):
        arena.battle("eager", "a red circle on a blue background")
    arena.battle("someone else", "a red circle on a blue background")  # another visitor is not held up


def test_votes_are_rate_limited_per_session(arena):
    battles = [arena.battle(f"voter-{i}", "a red circle on a blue background") for i in range(4)]
    arena.battle_limit = RateLimiter(10)
    more = [arena.battle("voter", "a red circle on a blue background") for _ in range(4)]
    for made in more[:3]:
        arena.vote("voter", made.battle_id, "tie")
    with pytest.raises(InvalidRequest, match="Try again in"):
        arena.vote("voter", more[3].battle_id, "tie")  # the fourth vote within a minute (limit 3)
    arena.vote("voter-0", battles[0].battle_id, "left")  # others still vote


def test_a_battle_can_be_voted_on_by_another_replica_or_after_a_restart(arena):
    """The binding to the session is in the store, not in one process's memory."""
    made = arena.battle("visitor", "a red circle on a blue background")
    replica = Arena(arena.text_to_image, arena.store, arena.contestants)
    with pytest.raises(InvalidRequest, match="another visitor"):
        replica.vote("someone else", made.battle_id, "left")
    assert replica.vote("visitor", made.battle_id, "right").choice == "right"
    stored = arena.store.battle(made.battle_id)
    assert stored.owner and "visitor" not in stored.owner  # a hash of the session id, not the id
