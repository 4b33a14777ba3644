import pytest

from studio.core.errors import InvalidRequest
from studio.core.jobs import JobBoard
from studio.core.sessions import RateLimiter


def test_rate_limit_counts_per_session_and_says_how_long_to_wait():
    now = [0.0]
    limiter = RateLimiter(limit=3, window_seconds=60, clock=lambda: now[0])
    for _ in range(3):
        limiter.check("alice")
    with pytest.raises(InvalidRequest, match="started 3 jobs in the last 60 seconds.*Try again in 60 s"):
        limiter.check("alice")
    limiter.check("bob")  # another visitor is not held up
    now[0] = 59.5
    with pytest.raises(InvalidRequest, match="Try again in 1 s"):
        limiter.check("alice")
    now[0] = 60.0
    limiter.check("alice")  # the first start left the window


def test_stop_reaches_the_job_of_its_own_tab_only():
    board = JobBoard(slots=8)
    text = board.open("alice", "text-to-image")
    inpaint = board.open("alice", "inpaint")
    other = board.open("bob", "inpaint")
    assert board.cancel("alice", "inpaint") == 1
    assert inpaint.cancelled and not text.cancelled and not other.cancelled


def test_stop_before_the_job_starts_is_kept_for_it():
    board = JobBoard(slots=8)
    board.submitted("alice", "inpaint")
    assert board.cancel("alice", "inpaint") == 1  # still waiting in the queue
    job = board.open("alice", "inpaint")
    assert job.cancelled
    board.close(job)
    board.submitted("alice", "inpaint")
    assert not board.open("alice", "inpaint").cancelled  # the next one starts clean


def test_slots_are_reused_and_progress_reads_back():
    board = JobBoard(slots=2)
    first = board.open("a", "t")
    first.report(3, 10, "Image 1/2, step 3/5")
    assert first.progress() == (3, 10, "Image 1/2, step 3/5")
    board.close(first)
    second, third = board.open("b", "t"), board.open("c", "t")
    assert {second.slot, third.slot} == {0, 1} and second.progress()[1] == 0
    with pytest.raises(RuntimeError, match="Too many jobs"):
        board.open("d", "t")
