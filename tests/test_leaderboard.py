"""Bradley–Terry on synthetic battles from known strengths: the order is recovered, the 95% intervals cover the truth
about 95% of the time, ties and a contestant with no votes are handled."""

import math

import numpy as np
import pytest

from studio.arena.leaderboard import (
    BOTH_BAD,
    ELO_SCALE,
    LEFT,
    RIGHT,
    TIE,
    Battle,
    clip_agreement,
    fit_scores,
    leaderboard,
)

TRUE_ELO = {"a": 1150.0, "b": 1050.0, "c": 1000.0, "d": 900.0}


def synthetic_battles(count: int, rng: np.random.Generator, tie_rate: float = 0.0) -> list[Battle]:
    names = list(TRUE_ELO)
    battles = []
    for _ in range(count):
        left, right = rng.choice(names, size=2, replace=False)
        p_left = 1 / (1 + 10 ** ((TRUE_ELO[right] - TRUE_ELO[left]) / 400))
        if rng.random() < tie_rate:
            choice = TIE
        else:
            choice = LEFT if rng.random() < p_left else RIGHT
        battles.append(Battle(str(left), str(right), choice))
    return battles


def centred(values: dict[str, float]) -> dict[str, float]:
    mean = np.mean(list(values.values()))
    return {name: value - mean + 1000 for name, value in values.items()}


def test_the_order_of_known_strengths_is_recovered():
    board = leaderboard(synthetic_battles(3000, np.random.default_rng(1)), list(TRUE_ELO), rounds=50)
    assert board.names == ["a", "b", "c", "d"]
    truth = centred(TRUE_ELO)
    for standing in board.standings:
        assert abs(standing.score - truth[standing.name]) < 30, (standing, truth)
        assert standing.low < standing.score < standing.high


def test_the_intervals_cover_the_truth_about_95_percent_of_the_time():
    truth, covered, total = centred(TRUE_ELO), 0, 0
    for trial in range(40):
        board = leaderboard(synthetic_battles(400, np.random.default_rng(100 + trial)), list(TRUE_ELO), rounds=100)
        for standing in board.standings:
            covered += standing.low <= truth[standing.name] <= standing.high
            total += 1
    assert 0.88 <= covered / total <= 0.995, covered / total  # 160 intervals: 95% ± sampling noise


def test_ties_count_half_and_pull_scores_together():
    even = [Battle("a", "b", TIE)] * 10 + [Battle("a", "b", LEFT)] * 10 + [Battle("b", "a", BOTH_BAD)] * 10
    beta = fit_scores(even, ["a", "b"])
    # a won 10 and tied 20 of 30: a's expected share 2/3, so β_a − β_b = ln 2 (up to the weak ridge)
    assert beta[0] - beta[1] == pytest.approx(math.log(2), rel=0.01)
    board = leaderboard(even, ["a", "b"], rounds=20)
    a = board.standings[0]
    assert a.name == "a" and a.ties == 20 and a.wins == 10 and a.win_rate == pytest.approx(20 / 30)
    assert board.standings[0].score - board.standings[1].score == pytest.approx(ELO_SCALE * math.log(2), rel=0.01)
    assert board.win_matrix[("a", "b")] == (pytest.approx(2 / 3), 30)


def test_a_contestant_with_no_votes_is_listed_without_a_score():
    board = leaderboard([Battle("a", "b", LEFT)] * 3, ["a", "b", "c"], rounds=10)
    assert board.names == ["a", "b", "c"]
    c = board.standings[-1]
    assert (c.score, c.low, c.high, c.battles, c.win_rate) == (None, None, None, 0, None)
    assert math.isfinite(board.standings[0].score)  # a won every battle: finite, thanks to the weak prior
    assert leaderboard([], ["a", "b"]).names == ["a", "b"]


def test_clip_agreement_counts_decided_scored_battles():
    battles = [Battle("a", "b", LEFT, 30.0, 20.0), Battle("a", "b", RIGHT, 30.0, 20.0),
               Battle("a", "b", LEFT, 10.0, 20.0), Battle("a", "b", TIE, 30.0, 20.0),
               Battle("a", "b", LEFT, None, 20.0), Battle("a", "b", RIGHT, 10.0, 25.0)]
    assert clip_agreement(battles) == (2, 4)


def test_an_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="unknown choice"):
        leaderboard([Battle("a", "b", "maybe")], ["a", "b"])


def test_the_command_line_prints_the_leaderboard_from_the_store(tmp_path, capsys):
    from studio.arena.__main__ import main
    from studio.arena.votes import StoredBattle, default_votes_url, open_store

    assert main(["--data-dir", str(tmp_path)]) == 1 and "No votes yet" in capsys.readouterr().err
    store = open_store(default_votes_url(tmp_path))
    for index, choice in enumerate(["left", "left", "right", "tie"]):
        store.add_battle(StoredBattle(f"b{index}", "p", index, "embedded-20-steps", {}, "embedded-8-steps", {},
                                      80.0, 79.0))
        store.vote(f"b{index}", choice)
    store.close()
    assert main(["--data-dir", str(tmp_path), "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "rank,contestant,score,95% low,95% high,battles,wins,ties,win rate,note"
    assert lines[1].startswith("1,embedded-20-steps,")
    assert lines[1].endswith(",4,2,1,62%,provisional: fewer than 10 battles")
    assert main(["--data-dir", str(tmp_path)]) == 0
    assert "CLIP picks the humans' winner in 2 of 3 decided battles" in capsys.readouterr().out


def test_a_newcomer_with_three_lost_battles_does_not_move_the_others():
    battles = synthetic_battles(400, np.random.default_rng(5))
    before = {s.name: s for s in leaderboard(battles, list(TRUE_ELO), rounds=60).standings}
    after = {s.name: s for s in leaderboard(battles + [Battle("e", "a", RIGHT)] * 3, [*TRUE_ELO, "e"],
                                            rounds=60).standings}
    for name in TRUE_ELO:
        assert abs(after[name].score - before[name].score) < 30, (name, before[name], after[name])
        width_before = before[name].high - before[name].low
        assert after[name].high - after[name].low < 1.5 * width_before
    assert after["e"].score < after["a"].score and after["e"].battles == 3
