"""The job runner binds each tab's engine by name: two engines whose plans are of one type (Text to image's and
Inpaint's SamplingPlan) each run their own plans, on their manager's one GPU function."""

import threading
import time
from dataclasses import dataclass

import pytest

from components import running
from components.running import JobRunner, follow_progress
from studio.core.jobs import JobBoard


@dataclass
class Plan:
    gpu_seconds: int = 5


class FakeEngine:
    def __init__(self, name, manager):
        self.name, self.manager = name, manager

    def run(self, plan, job):
        return self.name


def test_engines_with_the_same_plan_type_each_run_their_own_plans():
    made = []
    runner = JobRunner(board=JobBoard(slots=2), gpu=lambda fn, duration: made.append(fn) or fn)
    manager = object()
    text, inpaint = FakeEngine("text", manager), FakeEngine("inpaint", manager)
    text_call = runner.device_function("text_to_image", text)
    inpaint_call = runner.device_function("inpaint", inpaint)
    assert text_call(Plan(), 0) == "text" and inpaint_call(Plan(), 1) == "inpaint"
    assert len(made) == 1 and text_call.gpu is inpaint_call.gpu  # one GPU function per manager


def test_a_second_engine_under_a_taken_name_is_refused():
    runner = JobRunner(board=JobBoard(slots=1))
    manager = object()
    runner.device_function("inpaint", FakeEngine("a", manager))
    with pytest.raises(ValueError, match="already registered as 'inpaint'"):
        runner.device_function("inpaint", FakeEngine("b", manager))


def test_the_gpu_booking_reads_the_plans_own_estimate():
    durations = []

    def gpu(fn, duration):
        return lambda *args: durations.append(duration(*args)) or fn(*args)

    runner = JobRunner(board=JobBoard(slots=1), gpu=gpu)
    runner.device_function("upscale", FakeEngine("u", object()))(Plan(gpu_seconds=42), 0)
    assert durations == [42]


def test_the_work_runs_in_the_handlers_thread_while_its_progress_is_forwarded(monkeypatch):
    """Torch's thread pool belongs to the thread that runs the work: a new thread per job made each job slower
    (bench/api_overhead.py), so the work stays in gradio's (reused) handler thread and a helper forwards progress."""
    monkeypatch.setattr(running, "PROGRESS_INTERVAL_S", 0.01)
    board = JobBoard(slots=1)
    job = board.open("visitor", "text-to-image")
    shown = []

    def work():
        for step in range(1, 4):
            job.report(step, 3, f"Image 1/1, step {step}/3")
            deadline = time.monotonic() + 10
            while (not shown or shown[-1][0] != (step, 3)) and time.monotonic() < deadline:
                time.sleep(0.005)  # until the helper has shown this step
        return threading.get_ident()

    ran_in = follow_progress(work, job, lambda fraction, desc, unit: shown.append((fraction, desc)))
    assert ran_in == threading.get_ident()
    assert [fraction for fraction, _ in shown] == [(1, 3), (2, 3), (3, 3)]
    assert shown[-1][1] == "Image 1/1, step 3/3"


def test_following_ends_with_the_work_not_at_the_next_tick_and_raises_its_error(monkeypatch):
    monkeypatch.setattr(running, "PROGRESS_INTERVAL_S", 30.0)
    job = JobBoard(slots=1).open("visitor", "text-to-image")
    start = time.monotonic()
    assert follow_progress(lambda: "image", job, lambda *args, **kwargs: None) == "image"

    def fails():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        follow_progress(fails, job, lambda *args, **kwargs: None)
    assert time.monotonic() - start < 10  # not a 30 s tick each
    assert not [thread for thread in threading.enumerate() if thread.name == "job-progress"]
