"""
``bai-agent-ctl repl``'s bridge to a real reactor running in a thread of its own: calls
made from the REPL's thread run in the reactor's, and their results come back.
"""

import concurrent.futures
import threading

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.selectreactor import SelectReactor

from bai_agent.ctl.repl import ReactorThread

pytestmark = pytest.mark.functional


def test_reactor_thread_runs_calls_in_the_reactor_and_returns_results():
    reactor = SelectReactor()
    bridge = ReactorThread(reactor)
    bridge.start()
    try:
        assert bridge.submit(lambda: threading.current_thread().name).result(5) == "bai-reactor"
        assert bridge.submit(lambda: succeed(7)).result(5) == 7
        with pytest.raises(ValueError):
            bridge.submit(lambda: fail(ValueError("x"))).result(5)
        got = concurrent.futures.Future()
        bridge.call_soon(got.set_result, 1)
        assert got.result(5) == 1
    finally:
        bridge.stop()
    assert not bridge.thread.is_alive()
