"""The Arena tab: two hidden contestants make one image each for your prompt with the same seed; vote, see who they
were, and watch the leaderboard (Bradley–Terry scores with 95% intervals) change."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from components.event_options import INSTANT, NO_PROGRESS, QUICK
from components.running import JobRunner, session_of, user_error
from components.whole_numbers import WholeNumber
from studio.arena.battles import Arena
from studio.arena.leaderboard import CHOICES, CSV_HEADERS, Leaderboard, table_rows, to_csv
from studio.core.errors import StudioError
from studio.tasks.requests import whole

TAB = "arena"


@dataclass
class ArenaTab:
    battle_event: gr.events.Dependency
    show_board: Callable  # (demo) -> None: the current leaderboard on each page load


def leaderboard_table(board: Leaderboard, missing: str = "") -> dict:
    """The board's rows; `missing` for what a contestant has no value of yet (the page shows a dash)."""
    return {"headers": list(CSV_HEADERS), "data": table_rows(board, missing)}


def win_matrix_table(board: Leaderboard) -> dict:
    names = [s.name for s in board.standings if s.battles]
    rows = [[row] + [(f"{board.win_matrix[(row, column)][0]:.0%} of {board.win_matrix[(row, column)][1]}"
                      if (row, column) in board.win_matrix else "") for column in names] for row in names]
    return {"headers": ["row beats column"] + names, "data": rows}


def leaderboard_csv(board: Leaderboard) -> str:
    """The board as a CSV file for the download button, named by its content and written whole before it appears
    (gradio caches a file by its content: one rewritten in place could be cached half written)."""
    text = to_csv(board)
    folder = Path(tempfile.gettempdir()) / f"diffusion-studio-arena-{os.getuid()}" / hashlib.sha256(
        text.encode()).hexdigest()[:16]
    path = folder / "arena-leaderboard.csv"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{os.getpid()}-{threading.get_ident()}.csv"
        partial.write_text(text)
        os.replace(partial, path)
    return str(path)


def clip_agreement_note(board: Leaderboard) -> str:
    same, decided = board.clip_agreement
    if not decided:
        return "CLIP agreement: no decided battle with CLIP scores yet."
    return (f"**CLIP agreement:** in {same} of {decided} battles people decided ({same / decided:.0%}), the image with "
            "the higher CLIP score is the one they picked (50% would be chance).")


def build_arena_tab(arena: Arena, runner: JobRunner, examples: list[str]) -> ArenaTab:
    gr.Markdown("Two contestants (a model with its sampler, steps and CFG) draw your prompt with the same seed; their "
                "names stay hidden until you vote. Votes build the leaderboard below.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder=examples[0] if examples else "")
            with gr.Row():
                seed = WholeNumber(-1, label="Seed (-1 = random)", scale=2)
                surprise = gr.Button("Random prompt", scale=1)
            with gr.Row():
                start = gr.Button("New battle", variant="primary", scale=3)
                stop = gr.Button("Stop", variant="stop", scale=1)
        with gr.Column(scale=7):
            with gr.Row():
                left = gr.Image(label="Left", type="pil", format="png", interactive=False, height=320,
                                elem_id="arena-left", elem_classes="arena-image")
                right = gr.Image(label="Right", type="pil", format="png", interactive=False, height=320,
                                 elem_id="arena-right", elem_classes="arena-image")
            battle_id = gr.Textbox(label="Battle id", visible=False)  # the API names outputs by their labels
            with gr.Row():
                votes = {choice: gr.Button(label, interactive=False) for choice, label in
                         zip(CHOICES, ("Left is better", "Right is better", "Tie", "Both are bad"))}
            reveal = gr.Markdown("", elem_id="arena-reveal")
    with gr.Accordion("Leaderboard", open=True):
        # filled when each page loads (show_board), not once when the server starts
        table = gr.Dataframe(headers=list(CSV_HEADERS), label="Bradley–Terry scores (Elo scale, 95% bootstrap "
                             "interval); a tie counts half a win; scores from fewer than 10 battles are provisional "
                             "and have no interval yet (–)",
                             interactive=False, elem_id="arena-leaderboard")
        agreement = gr.Markdown("")
        matrix = gr.Dataframe(label="Win rate of each row against each column", interactive=False)
        with gr.Row():
            refresh = gr.Button("Refresh", scale=1)
            download = gr.DownloadButton("Download CSV", scale=1)

    on_device = runner.device_function("arena", arena)

    def check(prompt, request: gr.Request):
        """Instant feedback before the battle waits in the GPU queue; it then counts as waiting (Stop reaches it)."""
        if not (prompt or "").strip():
            raise gr.Error("Enter a prompt (or take a random one) to start a battle.", title="Cannot start the battle",
                           print_exception=False)
        runner.submitted(request, TAB)

    def battle(prompt, seed, request: gr.Request, progress=gr.Progress()):
        """Two hidden contestants make one image each for `prompt` with the same `seed` (-1: random). Returns the
        battle id (vote with it through /arena_vote) and the left and right images; Client.submit also sees each
        side's live preview as it forms (the battle id empty until both are made)."""
        session = session_of(request)

        def side_forming(shown, caption, part):  # each side's live preview on its own side, names still hidden
            # (the right is emptied while the left forms: the last battle's right image is not this one's)
            return (gr.skip(), shown, None) if part == 0 else (gr.skip(), gr.skip(), shown)

        def recorded(plan, images):
            made = arena.record(session, plan, images)
            return made.battle_id, made.left, made.right

        yield from runner.stream_job(
            TAB, request, progress, arena,
            lambda: arena.plan(session, prompt or "", whole(seed) if seed is not None else -1), on_device,
            "Cannot start the battle", side_forming, recorded)

    def arena_vote(battle_id: str, choice: str, request: gr.Request) -> str:
        """Your vote on the battle `battle_id`: "left", "right", "tie" or "both bad". Returns who the two
        contestants were, once the vote is stored durably."""
        try:
            revealed = arena.vote(session_of(request), battle_id or "", choice)
        except StudioError as error:
            raise user_error(error, "Vote not recorded") from None
        return (f"Vote recorded ({choice}). **Left:** {revealed.left} · **Right:** {revealed.right}. "
                "Start a new battle for the next vote.")

    def leaderboard() -> dict:
        """The leaderboard: each contestant's Bradley–Terry score on an Elo scale with its 95% interval, battles,
        wins, ties and win rate ({"headers", "data"})."""
        return leaderboard_table(arena.leaderboard())

    def refreshed():
        current = arena.leaderboard()
        return (leaderboard_table(current, missing="–"), clip_agreement_note(current), win_matrix_table(current),
                leaderboard_csv(current))

    def voter(choice: str):
        def on_click(battle_id, request: gr.Request):
            return arena_vote(battle_id, choice, request)
        return on_click

    board_outputs = [table, agreement, matrix, download]
    one_fit = dict(concurrency_id="arena-leaderboard", concurrency_limit=1)  # a refit takes seconds with many votes
    progress_on_table = dict(show_progress_on=[table])  # one progress bar, not one on each of the board's parts
    surprise.click(lambda: random.choice(examples) if examples else "", None, prompt, **INSTANT)
    checked = start.click(check, prompt, None, **QUICK)
    # the last battle's votes end as the new one starts: its images are replaced by the new ones as they form
    checked.success(lambda: ["", "", *[gr.Button(interactive=False) for _ in CHOICES]], None,
                    [battle_id, reveal, *votes.values()], **INSTANT)
    battle_event = checked.success(
        battle, [prompt, seed], [battle_id, left, right], api_name="arena_battle", concurrency_id="gpu",
        concurrency_limit=runner.concurrency, show_progress_on=[left, right])
    runner.wire_stop(stop, TAB)
    battle_event.failure(lambda: ("", None, None), None, [battle_id, left, right], **INSTANT)  # no half-made side
    battle_event.success(lambda: ["Which is better? Vote to see who made them.",
                                  *[gr.Button(interactive=True) for _ in CHOICES]], None, [reveal, *votes.values()],
                         **INSTANT)
    for choice, button in votes.items():
        # queued (not on the GPU), so that a refusal shows as a toast; the buttons are disabled once it is recorded
        button.click(voter(choice), battle_id, reveal, **QUICK).success(
            lambda: [gr.Button(interactive=False) for _ in CHOICES], None, list(votes.values()), **INSTANT
        ).then(refreshed, None, board_outputs, api_visibility="private", **one_fit, **progress_on_table)
    refresh.click(refreshed, None, board_outputs, api_visibility="private", **one_fit, **progress_on_table)
    # API-only endpoints on hidden components, so that their parameters and results have names and types
    # (gr.api would call the result "1st")
    with gr.Group(visible=False):
        api_choice = gr.Dropdown(list(CHOICES), value=None, label="Choice",  # no default: the caller chooses
                                 allow_custom_value=True)  # anything else reaches Arena.vote, which lists the choices
        api_revealed = gr.Textbox(label="Revealed contestants")
        api_board = gr.JSON(label="Leaderboard")
        api_vote, api_leaderboard = gr.Button(), gr.Button()
    api_vote.click(arena_vote, [battle_id, api_choice], api_revealed, api_name="arena_vote", concurrency_limit=None)
    api_leaderboard.click(leaderboard, None, api_board, api_name="leaderboard", **one_fit)

    def show_board(demo: gr.Blocks) -> None:
        demo.load(refreshed, None, board_outputs, api_visibility="private", **one_fit, **NO_PROGRESS)

    return ArenaTab(battle_event, show_board)
