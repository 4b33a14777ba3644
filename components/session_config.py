"""What gradio does at every API call made without a session, made cheaper.

gradio 6.31 gives each call of the documented HTTP API (POST /gradio_api/call/<name>, no session_hash) a new
session, and builds its SessionState then, on the server's event loop: the config of every block of the page
(gradio/state_holder.py: SessionState.__init__ -> Blocks.config_for_block -> Block.get_config), where get_config
recomputes `inspect.signature(cls.__init__)` for each block each time. With this app's ~250 blocks that was about
15 ms of every such call (measured on the 2-core machine: a trivial endpoint answered in 9 ms in a one-button app,
24-30 ms in this one, 9 ms here too when the caller reuses a session_hash, 18 ms with the cache below).

A class's __init__ signature never changes, so it is computed once and stored as the function's `__signature__`,
where inspect.signature looks first: the same Signature object, without the parsing. The configs are unchanged
(tests/test_app_build.py).

Even so, building every config took 5.8 ms per session (249 blocks) and kept 400 KB in it, and gradio keeps each
API call's session until 10,000 newer ones push it out (StateHolder's capacity): about 4 GB on a busy public
server. Yet a session reads a block's config only when an event touches that block (its inputs and outputs), or
for a deep link (all of them). `SessionWithConfigsOnDemand` makes each config when it is first read, and all of
them when they are listed: the same configs, later, and only those used."""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import threading
import weakref
from copy import copy

import gradio as gr
import gradio.state_holder

log = logging.getLogger("studio.requests")


def cache_init_signatures(demo: gr.Blocks) -> int:
    """Stores the signature of the __init__ of every block class on the page (and of the classes they inherit
    from); returns how many were stored now."""
    stored = 0
    for cls in {type(block) for block in demo.blocks.values()}:
        for klass in cls.__mro__:
            init = vars(klass).get("__init__")
            if inspect.isfunction(init) and "__signature__" not in vars(init):
                init.__signature__ = inspect.signature(init)
                stored += 1
    return stored


# gradio's SessionState as SessionWithConfigsOnDemand copies it (6.31.0): another gradio keeps its own class until
# someone compares the two again (tests/test_app_build.py pins this)
GRADIO_SESSION_STATE_SHA256 = "cf7fe461008045411e90162d83e87cc612760f944d4b6cb01eb236e4d76eef76"


def gradio_session_state_source_hash() -> str:
    """Of gradio's own class (the one ours derives from, whether or not the module's name is ours yet)."""
    return hashlib.sha256(inspect.getsource(SessionWithConfigsOnDemand.__mro__[1]).encode()).hexdigest()


class _ConfigsOnDemand(dict):
    """A session's block configs: a block's own when it is first looked up, all of them (in the page's order, as
    gradio's eager dict has them) the first time they are listed; a plain dict from then on.

    gradio reads and writes them from the event loop (an event's inputs and outputs) and from worker threads (the
    deep-link route), so making and completing them holds a lock. Methods gradio 6.31 does not use on them (`get`,
    `copy`, `==`, `pop`) see only the configs made so far."""

    def __init__(self, session: gradio.state_holder.SessionState, page_blocks):
        super().__init__()
        self._session = weakref.ref(session)  # no cycle: an evicted session is freed at once, as gradio's is
        self._page_blocks = page_blocks
        self._lock = threading.RLock()
        self._completed = False

    def _blocks(self) -> dict:
        return self._session().blocks_config.blocks

    def _config_of(self, key: int) -> dict:
        return self._session().blocks_config.config_for_block(key, [], self._blocks()[key])

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, key) or (key in self._page_blocks and key in self._blocks())

    def __missing__(self, key: int) -> dict:
        with self._lock:
            if dict.__contains__(self, key):  # made by another thread meanwhile
                return dict.__getitem__(self, key)
            if key not in self:
                raise KeyError(key)
            config = self._config_of(key)
            dict.__setitem__(self, key, config)
            return config

    def __setitem__(self, key: int, config: dict) -> None:
        with self._lock:
            dict.__setitem__(self, key, config)

    def _complete(self) -> None:
        with self._lock:
            if self._completed:
                return
            made = dict(super().items())
            ordered = {key: made.pop(key) if key in made else self._config_of(key)
                       for key in self._blocks() if key in self._page_blocks}
            super().clear()
            super().update(ordered | made)  # then the ones set for other blocks, as gradio appends them
            self._completed = True

    def items(self):
        self._complete()
        return super().items()

    def keys(self):
        self._complete()
        return super().keys()

    def values(self):
        self._complete()
        return super().values()

    def __iter__(self):
        self._complete()
        return super().__iter__()

    def __len__(self) -> int:
        self._complete()
        return super().__len__()


class SessionWithConfigsOnDemand(gradio.state_holder.SessionState):
    """gradio's SessionState with its block configs made on demand (see the module)."""

    def __init__(self, blocks: gr.Blocks):
        # gradio 6.31's __init__ (gradio/state_holder.py) but for the configs; tests/test_app_build.py checks that
        # both hold the same attributes and configs
        self.blocks_config = copy(blocks.default_config)
        self.config_values = _ConfigsOnDemand(self, blocks.blocks)
        self.state_data = {}
        self._state_ttl = {}
        self.is_closed = False
        self.STATE_TTL_WHEN_CLOSED = 1 if os.getenv("GRADIO_IS_E2E_TEST", None) else 3600


def make_session_configs_on_demand() -> bool:
    """The sessions gradio's servers keep (StateHolder makes them through the module's name `SessionState`, which
    is what this replaces) make their block configs on demand. gradio's other, short-lived sessions (a call through
    /run without a session, MCP) still make them all. Returns whether it is in place: only over the gradio class
    this copies, with a warning otherwise."""
    if gradio.state_holder.SessionState is SessionWithConfigsOnDemand:
        return True
    if gradio_session_state_source_hash() != GRADIO_SESSION_STATE_SHA256:
        log.warning("gradio %s's SessionState is not the one components/session_config.py copies: every API call "
                    "without a session builds every block's config again (slower, more memory per call)",
                    gr.__version__)
        return False
    gradio.state_holder.SessionState = SessionWithConfigsOnDemand
    return True
