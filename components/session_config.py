"""What gradio does at every API call made without a session, made cheaper.

gradio 6.31 gives each call of the documented HTTP API (POST /gradio_api/call/<name>, no session_hash) a new
session, and builds its SessionState then, on the server's event loop: the config of every block of the page
(gradio/state_holder.py: SessionState.__init__ -> Blocks.config_for_block -> Block.get_config), where get_config
recomputes `inspect.signature(cls.__init__)` for each block each time. With this app's ~250 blocks that was about
15 ms of every such call (measured on the 2-core machine: a trivial endpoint answered in 9 ms in a one-button app,
24-30 ms in this one, 9 ms here too when the caller reuses a session_hash, 18 ms with the cache below).

A class's __init__ signature never changes, so it is computed once and stored as the function's `__signature__`,
where inspect.signature looks first: the same Signature object, without the parsing. The configs are unchanged
(tests/test_app_build.py)."""

from __future__ import annotations

import inspect

import gradio as gr


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
