"""Stopping on SIGINT / SIGTERM (continual_kd/stopping.py): the handler sets a lock-free flag, a second signal can
interrupt at once, the old handlers come back; `ckd serve` stops on a double Ctrl-C at once and quietly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pytest

from continual_kd.stopping import StopFlag, catch_stop_signals, nap_until, restore_signals


def test_a_signal_sets_the_flag_a_second_interrupts_and_the_handlers_come_back():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stop = StopFlag()
    handlers = catch_stop_signals(stop, interrupt_on_second=True)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert nap_until(stop, 5.0) and stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler runs at the next bytecode; it must not get this far
    finally:
        restore_signals(handlers)
    assert {sig: signal.getsignal(sig) for sig in before} == before

    quiet = StopFlag()  # without interrupt_on_second: every signal only asks for the stop
    handlers = catch_stop_signals(quiet)
    try:
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGINT)
        assert nap_until(quiet, 5.0)
    finally:
        restore_signals(handlers)
    assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]


def test_a_second_signal_runs_the_handler_it_replaced():
    """`submit --follow`: a second Ctrl-C stops at once through the handler that was there before (the CLI's, which
    prints the "interrupted" line); a handler that is not a function (the default) → KeyboardInterrupt."""
    calls = []

    def before(signum, frame):
        calls.append(signum)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, before)
    try:
        stop = StopFlag()
        handlers = catch_stop_signals(stop, interrupt_on_second=True)
        assert handlers[signal.SIGINT] is before
        try:
            os.kill(os.getpid(), signal.SIGINT)
            assert nap_until(stop, 5.0) and calls == []  # the first only asks for the stop
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            assert calls == [signal.SIGINT]
        finally:
            restore_signals(handlers)
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, old)


def test_the_flag_holds_no_lock_a_nested_handler_could_wait_on():
    """A signal handler runs between two bytecodes of whatever the main thread does, even inside an earlier
    handler: a threading.Event's set there waits for its own lock for ever. The flag's set takes none."""
    assert not hasattr(StopFlag(), "__dict__") and StopFlag.__slots__ == ("_set",)  # nothing but the boolean
    ev = threading.Event()
    with ev._cond:  # the state a nested handler meets when it interrupts Event.set (or the main thread's wait)
        blocked = threading.Thread(target=ev.set, daemon=True)
        blocked.start()
        blocked.join(0.5)
        assert blocked.is_alive()  # an Event would hang here
        stop = StopFlag()
        stop.set()  # the flag does not
        assert stop.is_set()
    blocked.join(5)


def test_nap_until_returns_at_the_stop_or_the_time():
    stop = StopFlag()
    t0 = time.monotonic()
    assert not nap_until(stop, 0.3) and 0.25 <= time.monotonic() - t0 < 3
    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    assert nap_until(stop, 30.0) and time.monotonic() - t0 < 5


@pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")
def test_ctrl_c_twice_stops_serve_at_once_and_quietly(tiny_job, tmp_path):
    """`ckd serve` on its embedded Ray, waiting for a job's first block; two SIGINTs in a row (a double Ctrl-C):
    it stops with "stopped" and exit 0, without the raylet's "graceful_shutdown failed" noise or a traceback."""
    from continual_kd.runtime.serve import free_port, get_json
    from continual_kd.stream import StreamStore

    job_file = tiny_job()
    StreamStore.open(tmp_path / "stores" / "tiny", create=True).ingest_table(
        pa.table({"user": ["u1", "u2"], "item": ["i1", "i2"], "timestamp": [1, 2]}), "ratings")
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "continual_kd.cli", "serve", str(job_file), "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, health = time.monotonic() + 120, {}
        while health.get("status") != "waiting" and time.monotonic() < deadline and proc.poll() is None:
            try:
                _, health = get_json("127.0.0.1", port, "/healthz", timeout=2)
            except (OSError, ValueError):
                time.sleep(0.3)
        assert health.get("status") == "waiting", health
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)  # two deliveries, not one pending signal: the second lands while the first is handled or after
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert out.rstrip().endswith("stopped"), out
    assert "graceful_shutdown" not in out and "Traceback" not in out, out
