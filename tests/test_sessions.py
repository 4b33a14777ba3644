import threading

from studio.sessions import CancelRegistry


def test_stop_reaches_the_running_request_of_its_session_only():
    registry = CancelRegistry()
    with registry.running("alice") as alice, registry.running("bob") as bob:
        assert registry.cancel("alice") == 1
        assert alice.is_set() and not bob.is_set()
    assert registry.cancel("alice") == 0


def test_stop_before_the_request_starts_is_kept_for_it():
    registry = CancelRegistry()
    registry.submitted("alice")
    registry.cancel("alice")  # still waiting in the queue
    with registry.running("alice") as event:
        assert event.is_set()
    with registry.running("alice") as event:  # the next request starts clean
        assert not event.is_set()


def test_concurrent_requests_of_one_session_are_all_stopped():
    registry = CancelRegistry()
    started, events = threading.Barrier(3), []

    def run():
        with registry.running("s") as event:
            events.append(event)
            started.wait()
            event.wait(timeout=5)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    started.wait()
    assert registry.cancel("s") == 2
    for thread in threads:
        thread.join(timeout=5)
    assert all(event.is_set() for event in events)
