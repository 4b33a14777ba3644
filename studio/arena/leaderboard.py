"""The Arena's leaderboard: Bradley–Terry scores fitted on the battles, as public model arenas compute them.

Each battle is a row of a logistic regression, P(left beats right) = σ(β_left − β_right); a tie (or "both bad") counts
as half a win for each side, as Chatbot Arena counts ties. The scores are put on an Elo-like scale
(400·β/ln 10, centred so that the mean over battles fought is 1000: 100 points more means winning 64% of the time).
A weak Gaussian prior on β (ridge 0.05: a standard deviation of about 550 points) keeps a contestant that has won
or lost every battle finite. The 95% intervals are a percentile bootstrap over battles (refitted on battles drawn
with replacement, with a fixed seed; a resample without a contestant's battles says nothing about it and is left
out of its interval). A contestant with fewer than PROVISIONAL_BATTLES battles is marked provisional, and its
interval is not given yet (a handful of battles resample to nearly the same score: an interval of zero width).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

LEFT, RIGHT, TIE, BOTH_BAD = "left", "right", "tie", "both bad"
CHOICES = (LEFT, RIGHT, TIE, BOTH_BAD)
ELO_SCALE = 400 / math.log(10)
ELO_CENTRE = 1000.0
RIDGE = 0.05  # on β in natural log-odds: a Gaussian prior with variance 10, weaker than a handful of battles
PROVISIONAL_BATTLES = 10
BOOTSTRAP_ROUNDS = 200
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Battle:
    left: str
    right: str
    choice: str  # one of CHOICES
    clip_left: float | None = None  # the CLIP scores of the two images, where they were scored
    clip_right: float | None = None


@dataclass(frozen=True)
class Standing:
    name: str
    score: float | None  # None: no votes yet
    low: float | None
    high: float | None
    battles: int
    wins: int
    ties: int  # ties and "both bad"

    @property
    def win_rate(self) -> float | None:
        """Wins, with a tie as half a win, over battles."""
        return (self.wins + self.ties / 2) / self.battles if self.battles else None

    @property
    def has_interval(self) -> bool:
        """Whether its 95% interval says anything yet: from PROVISIONAL_BATTLES battles on, and not of zero width
        (after one battle, or battles all alike, every resample gives the same score)."""
        return (self.score is not None and self.battles >= PROVISIONAL_BATTLES
                and round(self.high) > round(self.low))


@dataclass(frozen=True)
class Leaderboard:
    standings: tuple[Standing, ...]  # best first; those without votes last
    win_matrix: dict[tuple[str, str], tuple[float, int]]  # (row, column) -> (row's win rate against column, battles)
    clip_agreement: tuple[int, int]  # battles with a human winner where CLIP picked the same / all such battles scored

    @property
    def names(self) -> list[str]:
        return [standing.name for standing in self.standings]


def fit_scores(battles: Sequence[Battle], names: Sequence[str]) -> np.ndarray:
    """Bradley–Terry strengths β (natural log-odds), one per name, by maximum likelihood (weak ridge)."""
    index = {name: i for i, name in enumerate(names)}
    left = np.array([index[b.left] for b in battles])
    right = np.array([index[b.right] for b in battles])
    # P(left wins) target: 1, 0, or 1/2 for a tie (two half-weighted rows, as Chatbot Arena duplicates them)
    target = np.array([1.0 if b.choice == LEFT else 0.0 if b.choice == RIGHT else 0.5 for b in battles])

    def loss(beta: np.ndarray) -> tuple[float, np.ndarray]:
        margin = beta[left] - beta[right]
        # cross-entropy of σ(margin) against the target, written stably
        value = np.sum(np.logaddexp(0, margin) - target * margin) + RIDGE * np.sum(beta**2)
        residual = 1 / (1 + np.exp(-margin)) - target
        gradient = np.bincount(left, residual, len(names)) - np.bincount(right, residual, len(names))
        return value, gradient + 2 * RIDGE * beta

    result = minimize(loss, np.zeros(len(names)), jac=True, method="L-BFGS-B", options={"maxiter": 1000})
    return result.x


def elo(beta: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Elo-like scores, centred on the battle-weighted mean: a contestant with three battles cannot move the rest."""
    scores = ELO_SCALE * beta
    return scores - np.average(scores, weights=weights) + ELO_CENTRE


def battle_counts(battles: Sequence[Battle], names: Sequence[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(names)}
    counts = np.zeros(len(names))
    for b in battles:
        counts[index[b.left]] += 1
        counts[index[b.right]] += 1
    return counts


def leaderboard(battles: Sequence[Battle], contestants: Sequence[str], rounds: int = BOOTSTRAP_ROUNDS,
                seed: int = BOOTSTRAP_SEED) -> Leaderboard:
    """Scores with 95% bootstrap intervals, counts and win rates for every contestant, those with battles fitted."""
    for battle in battles:
        if battle.choice not in CHOICES:
            raise ValueError(f"unknown choice {battle.choice!r}")
    voted = sorted({b.left for b in battles} | {b.right for b in battles})
    scores, low, high = {}, {}, {}
    if voted:
        point = elo(fit_scores(battles, voted), battle_counts(battles, voted))
        rng = np.random.default_rng(seed)
        samples = np.full((rounds, len(voted)), np.nan)
        for row in range(rounds):
            resample = [battles[i] for i in rng.integers(0, len(battles), len(battles))]
            counts = battle_counts(resample, voted)
            scored = elo(fit_scores(resample, voted), counts)
            samples[row, counts > 0] = scored[counts > 0]  # absent from this resample: no evidence about it
        for i, name in enumerate(voted):
            scores[name] = float(point[i])
            low[name], high[name] = (float(v) for v in np.nanpercentile(samples[:, i], [2.5, 97.5]))
    standings = []
    for name in dict.fromkeys([*contestants, *voted]):
        mine = [b for b in battles if name in (b.left, b.right)]
        wins = sum((b.choice == LEFT and b.left == name) or (b.choice == RIGHT and b.right == name) for b in mine)
        ties = sum(b.choice in (TIE, BOTH_BAD) for b in mine)
        standings.append(Standing(name, scores.get(name), low.get(name), high.get(name), len(mine), wins, ties))
    standings.sort(key=lambda s: (s.score is None, -(s.score or 0), s.name))
    return Leaderboard(tuple(standings), win_matrix(battles), clip_agreement(battles))


def win_matrix(battles: Sequence[Battle]) -> dict[tuple[str, str], tuple[float, int]]:
    """For each ordered pair that met: the row's win rate against the column (a tie half a win), and how often."""
    tallies: dict[tuple[str, str], list[float]] = {}
    for b in battles:
        left_share = 1.0 if b.choice == LEFT else 0.0 if b.choice == RIGHT else 0.5
        for row, column, share in ((b.left, b.right, left_share), (b.right, b.left, 1 - left_share)):
            tally = tallies.setdefault((row, column), [0.0, 0])
            tally[0] += share
            tally[1] += 1
    return {pair: (won / count, count) for pair, (won, count) in tallies.items()}


def clip_agreement(battles: Sequence[Battle]) -> tuple[int, int]:
    """Of the battles the humans decided (left or right) whose two images were CLIP-scored: how many times the image
    with the higher CLIP score is the one people picked, and how many such battles there were."""
    decided = [b for b in battles if b.choice in (LEFT, RIGHT) and b.clip_left is not None
               and b.clip_right is not None and b.clip_left != b.clip_right]
    same = sum((b.clip_left > b.clip_right) == (b.choice == LEFT) for b in decided)
    return same, len(decided)


CSV_HEADERS = ("rank", "contestant", "score", "95% low", "95% high", "battles", "wins", "ties", "win rate", "note")


def table_rows(board: Leaderboard, missing: str = "") -> list[list]:
    """The leaderboard as rows (CSV_HEADERS), ranked; what a contestant does not have yet is `missing`: rank, score
    and win rate without votes, the 95% interval until it says something (Standing.has_interval)."""
    rows = []
    for rank, standing in enumerate(board.standings, start=1):
        scored, interval = standing.score is not None, standing.has_interval
        rows.append([rank if scored else missing, standing.name,
                     round(standing.score) if scored else missing, round(standing.low) if interval else missing,
                     round(standing.high) if interval else missing, standing.battles, standing.wins, standing.ties,
                     f"{standing.win_rate:.0%}" if standing.win_rate is not None else missing,
                     "no votes yet" if not standing.battles else
                     f"provisional: fewer than {PROVISIONAL_BATTLES} battles" if standing.battles < PROVISIONAL_BATTLES
                     else ""])
    return rows


def to_csv(board: Leaderboard) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADERS)
    writer.writerows(table_rows(board))
    return buffer.getvalue()
