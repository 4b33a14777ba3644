"""Per-session cancellation: the Stop button sets the event that the running request checks every step."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class CancelRegistry:
    """Maps a session (gradio's session_hash) to the cancel events of its running requests."""

    def __init__(self):
        self._events: dict[str, list[threading.Event]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def running(self, session: str) -> Iterator[threading.Event]:
        event = threading.Event()
        with self._lock:
            self._events.setdefault(session, []).append(event)
        try:
            yield event
        finally:
            with self._lock:
                events = self._events.get(session, [])
                if event in events:
                    events.remove(event)
                if not events:
                    self._events.pop(session, None)

    def cancel(self, session: str) -> int:
        """Ask every running request of `session` to stop. Returns how many were asked."""
        with self._lock:
            events = list(self._events.get(session, []))
        for event in events:
            event.set()
        return len(events)
