"""The engine thread: blocks while idle, and hands results and errors back to the calling thread."""

import time

import pytest

from jlora.errors import UnknownAdapterError


def test_idle_engine_thread_blocks(served):
    engine = served.service.engine
    served.wait_idle()
    before = engine.wakeups
    time.sleep(0.5)
    assert engine.wakeups == before
    assert engine.call(lambda e: len(e.requests)).result(timeout=10) == 0
    assert engine.wakeups == before + 1


def test_call_raises_in_the_caller(served):
    future = served.service.engine.call(lambda e: e.store.unregister("never-loaded"))
    with pytest.raises(UnknownAdapterError, match="'never-loaded' is not loaded"):
        future.result(timeout=10)
