"""The job runner binds each tab's engine by name: two engines whose plans are of one type (Text to image's and
Inpaint's SamplingPlan) each run their own plans, on their manager's one GPU function."""

from dataclasses import dataclass

import pytest

from components.running import JobRunner
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
