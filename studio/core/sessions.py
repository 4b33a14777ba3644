"""Per-visitor limits for a public server: a sliding-window rate limit keyed by gradio's session hash."""

from __future__ import annotations

import math
import threading
import time
from collections import deque

from studio.core.errors import InvalidRequest


class RateLimiter:
    """At most `limit` jobs per `window_seconds` for each session. Gradio has no per-user limiter of its own."""

    def __init__(self, limit: int, window_seconds: float = 60.0, clock=time.monotonic, done: str = "started {} jobs"):
        self.limit = limit
        self.done = done  # what the visitor did, for the message: "cast {} votes"
        self.window = window_seconds
        self.clock = clock
        self._starts: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, session: str) -> None:
        """Count a new job for `session`, or raise InvalidRequest saying how long to wait."""
        now = self.clock()
        with self._lock:
            self._forget_idle_sessions(now)
            starts = self._starts.setdefault(session, deque())
            while starts and now - starts[0] >= self.window:
                starts.popleft()
            if len(starts) >= self.limit:
                wait = max(1, math.ceil(self.window - (now - starts[0])))
                raise InvalidRequest([f"You have {self.done.format(len(starts))} in the last {self.window:g} seconds, "
                                      f"the most this demo allows. Try again in {wait} s."])
            starts.append(now)

    def _forget_idle_sessions(self, now: float) -> None:
        for session in [s for s, starts in self._starts.items() if not starts or now - starts[-1] >= self.window]:
            del self._starts[session]
