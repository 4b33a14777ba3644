"""The Arena: two contestants drawn at random make one image each for the visitor's prompt with the same seed; their
names are hidden until the visitor votes (left better, right better, tie, both bad); the votes make a leaderboard.

A contestant is a configuration listed in presets/arena.yaml: a model preset with its sampler, steps, CFG and style.
Only contestants whose preset this server offers and whose files are here (or can be fetched) are drawn, so the
arena also runs offline on the embedded model's configurations.

Battle ids are unguessable (secrets.token_urlsafe) and bound to the session that got them (the store keeps a hash of
its id, so the binding holds across restarts and replicas): a vote for an unknown, foreign or already voted battle
is refused with a message. Battles and votes are stored by a VoteStore (studio/arena/votes.py); a vote is acknowledged
only after it is durable.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from studio.a1111.prompts import parse_prompt, plain_text
from studio.arena.leaderboard import CHOICES, Leaderboard, leaderboard
from studio.arena.votes import StoredBattle, VoteStore, owner_of
from studio.core.errors import InvalidRequest, StudioError
from studio.core.jobs import MAX_SECONDS, JobControl, LocalJob
from studio.core.sessions import RateLimiter
from studio.evaluation.compare import CLIP_SECONDS, CellJob
from studio.evaluation.metrics import ClipScorer
from studio.models.presets import PRESETS_DIR
from studio.tasks.generation import TextToImage, TextToImageRequest
from studio.tasks.requests import ProgressCallback, resolve_seed
from studio.tasks.sampling import SamplingPlan

log = logging.getLogger(__name__)

BATTLES_PER_MINUTE = 10
VOTES_PER_MINUTE = 20


@dataclass(frozen=True)
class Contestant:
    name: str
    preset: str
    sampler: str
    steps: int
    cfg: float
    style: str = "None"

    def settings(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "name"}


def load_contestants(path: str | Path = PRESETS_DIR / "arena.yaml") -> list[Contestant]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    contestants = []
    for name, fields in (data.get("contestants") or {}).items():
        try:
            contestants.append(Contestant(name=name, **fields))
        except TypeError as error:
            raise ValueError(f"{path}: contestant {name!r}: {error}") from None
    return contestants


@dataclass
class ArenaPlan:
    """A battle before it runs: the prompt, the seed, the two hidden contestants and their text-to-image plans
    (picklable: it crosses ZeroGPU's process boundary)."""

    prompt: str
    seed: int
    left: Contestant
    right: Contestant
    plans: list[SamplingPlan]  # left's, right's

    @property
    def total_steps(self) -> int:
        return sum(plan.total_steps for plan in self.plans)

    @property
    def gpu_seconds(self) -> int:
        return min(MAX_SECONDS, sum(plan.gpu_seconds for plan in self.plans) + CLIP_SECONDS)


@dataclass
class ArenaImages:
    left: object  # PIL images
    right: object
    clip_scores: tuple[float | None, float | None] = (None, None)


@dataclass(frozen=True)
class BattleImages:
    battle_id: str
    left: object
    right: object
    seed: int


@dataclass(frozen=True)
class Reveal:
    left: str
    right: str
    choice: str
    left_settings: dict
    right_settings: dict


class Arena:
    """Battles on the text-to-image engine, votes in a store, the leaderboard from the store."""

    def __init__(self, text_to_image: TextToImage, store: VoteStore, contestants: Sequence[Contestant],
                 clip: ClipScorer | None = None, battle_limit: RateLimiter | None = None,
                 vote_limit: RateLimiter | None = None, rng: secrets.SystemRandom | None = None):
        self.text_to_image = text_to_image
        self.manager = text_to_image.manager
        self.store = store
        self.clip = clip
        self.contestants = [c for c in contestants if self._can_run(c)]
        self.battle_limit = battle_limit or RateLimiter(BATTLES_PER_MINUTE, done="started {} battles")
        self.vote_limit = vote_limit or RateLimiter(VOTES_PER_MINUTE, done="cast {} votes")
        self.rng = rng or secrets.SystemRandom()
        self._board: tuple[int, Leaderboard] | None = None  # (votes it counts, the board): refitted when votes change
        self._board_lock = threading.Lock()
        skipped = [c.name for c in contestants if c not in self.contestants]
        log.info("Arena: %d of %d contestants can run here%s", len(self.contestants), len(contestants),
                 f" (not drawn: {', '.join(skipped)})" if skipped else "")

    def _can_run(self, contestant: Contestant) -> bool:
        """Its preset is offered here, its settings pass the checks, and its model files are here or can be had."""
        engine = self.text_to_image
        if contestant.preset not in engine.presets:
            return False
        if engine.problems(self._request(contestant, "x", 0)):
            return False
        preset = engine.presets.get(contestant.preset)
        try:
            engine.models.check_checkpoint_files(preset, "text2img")
            requests = engine.models.download_requests(preset, "text2img", engine.manager.dtype)
        except StudioError:
            return False
        return all(engine.downloads.is_cached(r) for r in requests) or not engine.downloads.is_offline()

    def _request(self, contestant: Contestant, prompt: str, seed: int) -> TextToImageRequest:
        """The contestant's settings at its preset's own size."""
        preset = self.text_to_image.presets.get(contestant.preset)
        return TextToImageRequest(prompt=prompt, preset=contestant.preset, scheduler=contestant.sampler,
                                  steps=contestant.steps, guidance_scale=contestant.cfg, style=contestant.style,
                                  seed=seed, width=preset.default_width, height=preset.default_height)

    def draw(self) -> tuple[Contestant, Contestant]:
        if len(self.contestants) < 2:
            raise InvalidRequest(["The arena needs two contestants that can run here; "
                                  f"{len(self.contestants)} can. See presets/arena.yaml."])
        left, right = self.rng.sample(self.contestants, 2)
        return left, right

    def plan(self, session: str, prompt: str, seed: int = -1) -> ArenaPlan:
        """Two contestants drawn and planned with one seed; counts against the session's battle limit."""
        if not (prompt or "").strip():
            raise InvalidRequest(["Enter a prompt (or take one of the examples) to start a battle."])
        if parse_prompt(prompt).loras:
            raise InvalidRequest(["The Arena compares models on the same words: take the <lora:…> tags out of the "
                                  "prompt. A LoRA fits one family of models only, so both contestants could not use "
                                  "it (and its error would tell which model is which)."])
        self.battle_limit.check(session)
        left, right = self.draw()
        seed = resolve_seed(seed)
        plans = [self.text_to_image.plan(self._request(contestant, prompt.strip(), seed)) for contestant in (left, right)]
        return ArenaPlan(prompt.strip(), seed, left, right, plans)

    @contextlib.contextmanager
    def model_files(self, plan: ArenaPlan, on_progress: ProgressCallback | None = None) -> Iterator[ArenaPlan]:
        """Both contestants' files (and hashes) fetched before any device work; yields the battle with both
        plans resolved."""
        with contextlib.ExitStack() as stack:
            resolved = [stack.enter_context(self.text_to_image.model_files(sampling_plan, on_progress))
                        for sampling_plan in plan.plans]
            yield replace(plan, plans=resolved)

    def run(self, plan: ArenaPlan, job: JobControl | None = None) -> ArenaImages:
        """The device work: one image per contestant (each a turn, other jobs between), then their CLIP scores."""
        job = job or LocalJob()
        images, done = [], 0
        for part, (side, sampling_plan) in enumerate(zip(("Left", "Right"), plan.plans)):
            # each side's live previews as a part of its own (0 left, 1 right): the page shows them in place
            made = self.text_to_image.run(sampling_plan, CellJob(job, done, plan.total_steps, side, part=part))
            done += sampling_plan.total_steps
            if made.interrupted or not made.images:
                raise InvalidRequest(["The battle was stopped before both images were made: start a new one."])
            images.append(made.images[0].image)
            if job.wants_previews:  # the side as made, while the other forms (if the page looks before it starts)
                job.show(images[-1], part)
        scores = (None, None)
        if self.clip is not None:
            try:
                scores = tuple(self.clip.scores(images, [plain_text(plan.prompt)] * 2))  # CLIP reads words alone
            except StudioError:  # the battle stands without them; the CLIP column counts scored battles only
                scores = (None, None)
        return ArenaImages(images[0], images[1], scores)

    def record(self, session: str, plan: ArenaPlan, images: ArenaImages) -> BattleImages:
        """The battle stored and bound to the session that started it; its id is unguessable."""
        battle_id = secrets.token_urlsafe(24)
        self.store.add_battle(StoredBattle(battle_id, plan.prompt, plan.seed, plan.left.name, plan.left.settings(),
                                           plan.right.name, plan.right.settings(), *images.clip_scores,
                                           owner=owner_of(session)))
        return BattleImages(battle_id, images.left, images.right, plan.seed)

    def battle(self, session: str, prompt: str, seed: int = -1) -> BattleImages:
        """Plan, fetch, run and record in this process."""
        plan = self.plan(session, prompt, seed)
        with self.model_files(plan) as plan:
            return self.record(session, plan, self.run(plan))

    def vote(self, session: str, battle_id: str, choice: str) -> Reveal:
        """Record the vote (durably) and reveal the names; refuse unknown, foreign and repeated votes."""
        if choice not in CHOICES:
            raise InvalidRequest([f"Choose one of {', '.join(CHOICES)} (got {choice!r})."])
        if not isinstance(battle_id, str) or not battle_id:
            raise InvalidRequest(["Give the battle id that /arena_battle returned."])
        self.vote_limit.check(session)
        recorded = self.store.vote(battle_id, choice, owner_of(session))
        stored = self.store.battle(battle_id)
        if not recorded:
            if stored is None:
                raise InvalidRequest(["Unknown battle: start a new battle, then vote on it."])
            if stored.owner != owner_of(session):
                raise InvalidRequest(["This battle belongs to another visitor: start a battle of your own."])
            if stored.choice != choice:  # the same choice again (a retried request) is the same vote: say so
                raise InvalidRequest(["This battle has a vote already: start a new battle."])
        return Reveal(stored.left_name, stored.right_name, choice, stored.left_settings, stored.right_settings)

    def leaderboard(self) -> Leaderboard:
        """The board, refitted only when the number of votes has changed (a refit bootstraps 200 fits)."""
        with self._board_lock:
            count = self.store.vote_count()
            if self._board is None or self._board[0] != count:
                battles = [b.as_battle() for b in self.store.voted_battles()]
                self._board = (len(battles), leaderboard(battles, [c.name for c in self.contestants]))
            return self._board[1]
