"""Per-session cancellation: the Stop button sets the event that the session's request checks every step.

A request is registered when it is submitted (`submitted`), before it waits in the queue, so Stop also
reaches a request that has not started yet; `running` then picks up that same event.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

PENDING_TTL_SECONDS = 3600  # a submitted request that never ran (tab closed) is forgotten after this


class CancelRegistry:
    """Maps a session (gradio's session_hash) to the cancel events of its submitted and running requests."""

    def __init__(self):
        self._pending: dict[str, tuple[threading.Event, float]] = {}
        self._running: dict[str, list[threading.Event]] = {}
        self._lock = threading.Lock()

    def submitted(self, session: str) -> None:
        """Note that `session` queued a request; Stop before it starts makes it return at once."""
        now = time.monotonic()
        with self._lock:
            for key in [k for k, (_, t) in self._pending.items() if now - t > PENDING_TTL_SECONDS]:
                del self._pending[key]
            self._pending[session] = (threading.Event(), now)

    @contextmanager
    def running(self, session: str) -> Iterator[threading.Event]:
        with self._lock:
            event, _ = self._pending.pop(session, (threading.Event(), 0.0))
            self._running.setdefault(session, []).append(event)
        try:
            yield event
        finally:
            with self._lock:
                events = self._running.get(session, [])
                if event in events:
                    events.remove(event)
                if not events:
                    self._running.pop(session, None)

    def cancel(self, session: str) -> int:
        """Ask every submitted or running request of `session` to stop. Returns how many were asked."""
        with self._lock:
            events = list(self._running.get(session, []))
            if session in self._pending:
                events.append(self._pending[session][0])
        for event in events:
            event.set()
        return len(events)
