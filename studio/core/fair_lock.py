"""The lock jobs take turns with."""

from __future__ import annotations

import collections
import threading


class FairLock:
    """A re-entrant lock granted in arrival order. A job that releases and asks again queues behind those
    already waiting, so jobs take turns instead of one of them winning every race for the lock."""

    def __init__(self):
        self._condition = threading.Condition(threading.Lock())
        self._waiting: collections.deque[object] = collections.deque()
        self._owner: int | None = None
        self._depth = 0

    def acquire(self, blocking: bool = True) -> bool:
        me = threading.get_ident()
        with self._condition:
            if self._owner == me:
                self._depth += 1
                return True
            if not blocking:
                if self._owner is None and not self._waiting:
                    self._owner, self._depth = me, 1
                    return True
                return False
            ticket = object()
            self._waiting.append(ticket)
            try:
                while self._owner is not None or self._waiting[0] is not ticket:
                    self._condition.wait()
            except BaseException:  # interrupted while waiting: give up the place in the queue
                self._waiting.remove(ticket)
                self._condition.notify_all()
                raise
            self._waiting.popleft()
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        with self._condition:
            if self._owner != threading.get_ident():
                raise RuntimeError("FairLock released by a thread that does not hold it")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._condition.notify_all()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
