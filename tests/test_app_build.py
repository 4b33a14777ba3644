"""The composition root: flags -> engine objects."""

import gc
import inspect
import weakref

import gradio.state_holder
import pytest
from gradio.state_holder import StateHolder

import app
from components.queue_polling import PROGRESS_POLL_S, QUEUE_POLL_S, poll_the_queue_less_often
from components.session_config import (
    GRADIO_SESSION_STATE_SHA256,
    SessionWithConfigsOnDemand,
    gradio_session_state_source_hash,
    make_session_configs_on_demand,
)
from studio.core.errors import UnknownPreset
from studio.tasks.requests import RequestLimits


def test_public_mode_narrows_the_presets_to_the_allow_list_with_stricter_limits():
    everything = app.build_studio(app.parse_args(["--device", "cpu"])).text_to_image.presets.names
    studio = app.build_studio(app.parse_args(["--public", "--device", "cpu", "--device-budget", "2GiB"]))
    engine = studio.text_to_image
    public = engine.presets.names
    assert set(public) < set(everything)  # really narrower ...
    assert {"dreamshaper-8", "realistic-vision-5.1", "anything-v5", "lcm-dreamshaper-7"}.isdisjoint(public)
    assert {"embedded", "stable-diffusion-1.5", "sdxl-base-1.0"} <= set(public)  # ... and still useful
    assert engine.limits == RequestLimits.public() and engine.limits.max_upload_pixels < 50_000_000
    assert studio.manager.device_budget == 2 * 1024**3
    assert studio.runner.limiter is not None and studio.runner.limiter.limit == app.PUBLIC_RATE_LIMIT
    assert engine.models.safety_checker_everywhere


def test_default_preset_flag_and_unknown_preset():
    studio = app.build_studio(app.parse_args(["--preset", "sd-turbo", "--device", "cpu"]))
    assert studio.text_to_image.presets.default == "sd-turbo"
    with pytest.raises(UnknownPreset, match="Unknown preset 'nope'"):
        app.build_studio(app.parse_args(["--preset", "nope", "--device", "cpu"]))


def test_the_ui_builds_with_the_named_endpoint():
    demo = app.build_ui(app.build_studio(app.parse_args(["--device", "cpu"])))
    api_names = {fn.api_name for fn in demo.fns.values()}
    assert "text_to_image" in api_names
    assert {"arena_battle", "arena_vote", "leaderboard"} <= api_names


def test_the_queue_is_bounded_and_polled_every_5_ms_not_every_1():
    demo = app.build_ui(app.build_studio(app.parse_args(["--device", "cpu"])))
    assert demo._queue.sleep_when_free == 0.001  # gradio's own default on Linux, before the app queues requests
    app.queue_requests(demo, app.parse_args(["--device", "cpu", "--public"]))
    assert demo._queue.max_size == 20
    assert (demo._queue.sleep_when_free, demo._queue.progress_update_sleep_when_free) == (0.005, 0.05) \
        == (QUEUE_POLL_S, PROGRESS_POLL_S)


def test_a_queue_without_polling_intervals_is_left_as_it_is(caplog):
    class Renamed:  # a gradio whose queue calls them something else
        _queue = type("Queue", (), {"sleep_when_free": None})()

    assert not poll_the_queue_less_often(Renamed())
    assert "keeps its own" in caplog.text and Renamed._queue.sleep_when_free is None


# gradio's own session, eager (the class ours derives from, whether or not the app has replaced gradio's name yet)
SessionState = SessionWithConfigsOnDemand.__mro__[1]


def test_cached_init_signatures_leave_every_blocks_config_as_gradio_makes_it(monkeypatch):
    """build_ui stores each block class's __init__ signature (components/session_config.py), which gradio reads for
    every block at every API call without a session: the session's configs are the ones gradio computes itself."""
    demo = app.build_ui(app.build_studio(app.parse_args(["--device", "cpu"])))
    cached = {init for cls in {type(block) for block in demo.blocks.values()} for klass in cls.__mro__
              if inspect.isfunction(init := vars(klass).get("__init__")) and "__signature__" in vars(init)}
    assert len(cached) >= 10  # gradio's components and ours (WholeSlider inherits gr.Slider's)
    with_cache = SessionState(demo).config_values
    for init in cached:
        monkeypatch.delattr(init, "__signature__")  # put back after the test
    assert SessionState(demo).config_values == with_cache


def test_a_new_session_makes_no_block_config_until_one_is_read(monkeypatch):
    """The server's sessions (one per API call without a session_hash) are ours once the UI is built; making one
    computes no config, and an event's inputs cost one config each."""
    demo = app.build_ui(app.build_studio(app.parse_args(["--device", "cpu"])))
    # the gradio class ours copies (a new gradio fails here until someone compares them again) is replaced
    assert gradio_session_state_source_hash() == GRADIO_SESSION_STATE_SHA256
    assert make_session_configs_on_demand() and gradio.state_holder.SessionState is SessionWithConfigsOnDemand
    holder = StateHolder()
    holder.set_blocks(demo)
    made = []
    config_for_block = type(demo.default_config).config_for_block
    monkeypatch.setattr(type(demo.default_config), "config_for_block",
                        staticmethod(lambda key, *rest: made.append(key) or config_for_block(key, *rest)))
    session = holder["an-api-call"]
    assert isinstance(session, SessionWithConfigsOnDemand) and made == []
    eager = SessionState(demo)
    assert set(vars(session)) == set(vars(eager))  # gradio's attributes, no more, no fewer, with its values
    assert session.blocks_config.blocks == eager.blocks_config.blocks and session.blocks_config.fns == eager.blocks_config.fns
    assert all(getattr(session, name) == getattr(eager, name) for name in vars(eager)
               if name not in ("blocks_config", "config_values"))
    prompt = next(block for block in demo.blocks.values() if getattr(block, "label", None) == "Prompt")
    made.clear()
    session[prompt._id] = prompt
    session._update_value_in_config(prompt._id, "a red circle")
    assert made == [prompt._id]


def test_configs_made_on_demand_are_the_ones_gradio_makes_at_once():
    """After the same updates (a component replaced, a value set, a config re-read), a session's configs, listed
    as a deep link lists them, equal those of gradio's eager session."""
    demo = app.build_ui(app.build_studio(app.parse_args(["--device", "cpu"])))
    eager, lazy = SessionState(demo), SessionWithConfigsOnDemand(demo)
    textboxes = [block for block in demo.blocks.values() if type(block).__name__ == "Textbox"][:3]
    for session in (eager, lazy):
        session[textboxes[0]._id] = type(textboxes[0])(value="replaced", label="A new label")
        session._update_value_in_config(textboxes[1]._id, "typed")
        session._update_config(textboxes[2]._id)
    assert lazy.config_values[textboxes[1]._id]["props"]["value"] == "typed"
    assert list(lazy.components) == list(eager.components)
    assert dict(lazy.config_values.items()) == eager.config_values and len(lazy.config_values) == len(eager.config_values)
    for session in (eager, lazy):  # listed once, then updated: the update is kept (nothing is made again)
        session._update_value_in_config(textboxes[1]._id, "typed again")
    assert list(lazy.components) == list(eager.components)


def test_an_evicted_session_is_freed_at_once_as_gradios_is():
    """The configs point back at their session weakly: no reference cycle keeps an evicted session (and its copy
    of the page's blocks) alive until a full garbage collection."""
    demo = app.build_ui(app.build_studio(app.parse_args(["--device", "cpu"])))
    gc.disable()
    try:
        session = SessionWithConfigsOnDemand(demo)
        session._update_value_in_config(next(iter(demo.blocks)), None)
        alive = weakref.ref(session)
        del session
        assert alive() is None
    finally:
        gc.enable()


def progress_targets(dependency: dict) -> list[int]:
    """The components a dependency shows its progress on, as the page reads its config (an empty list is none)."""
    targets = dependency["show_progress_on"]
    return dependency["outputs"] if targets is None else targets


def test_quick_events_show_no_progress_and_jobs_show_it_on_their_results_only():
    """gradio 6.31 re-reads, at every progress message of any job, every component an event has ever shown
    progress on, and its children: a quick event that names its outputs made every later image dearer for the page
    (components/event_options.py). gr.Examples' own event (a click on the examples' table) is gradio's."""
    demo = app.build_ui(app.build_studio(app.parse_args(["--device", "cpu"])))
    config = demo.get_config_file()
    kind = {component["id"]: component["type"] for component in config["components"]}
    ours = [dependency for dependency in config["dependencies"] if dependency["backend_fn"]
            and not any(kind.get(target) == "dataset" for target, _event in dependency["targets"])]
    quick = [dependency for dependency in ours if dependency["show_progress"] == "hidden"]
    showing = [dependency for dependency in ours if dependency["show_progress"] != "hidden"]
    assert len(quick) > 30 and all(progress_targets(dependency) == [] for dependency in quick)
    shown_on = [[kind[target] for target in progress_targets(dependency)] for dependency in showing]
    assert shown_on and all(1 <= len(kinds) <= 2 for kinds in shown_on), shown_on
    assert {one for kinds in shown_on for one in kinds} <= {"gallery", "imageslider", "image", "dataframe", "json",
                                                          "textbox"}, shown_on


def test_the_editor_and_the_tabs_are_never_read_or_written_by_the_server():
    """Once the ImageEditor (or the Tabs around it) was an input or output of a server event, gradio 6.31 re-read it
    at every progress message of any later job, and the browser uploaded the editor's image each time; and a server
    handler that read the editor and set its brush ran in a loop. Only events that run in the page touch them."""
    demo = app.build_ui(app.build_studio(app.parse_args(["--device", "cpu"])))
    config = demo.get_config_file()
    guarded = {component["id"] for component in config["components"]
               if component["type"] == "tabs" or component["props"].get("elem_id") == "inpaint-editor"}
    assert len(guarded) == 2 + 3  # the app's tabs, the editor; the unit tabs of three ControlNet sections
    in_the_page = [dependency for dependency in config["dependencies"] if guarded & {*dependency["inputs"],
                                                                                    *dependency["outputs"]}]
    assert in_the_page and all(not dependency["backend_fn"] and dependency["js"] for dependency in in_the_page)
    shown_on = {target for dependency in config["dependencies"] for target in progress_targets(dependency)}
    assert not guarded & shown_on
