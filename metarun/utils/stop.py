"""SIGINT and SIGTERM as requests to stop, honoured between units of work.

While a task runs under ``handle_signals()``, the first SIGINT or SIGTERM only sets a flag; long
loops (training iterations, validation and test batches, the tasks of a meta-batch, dataset
decoding) call ``check()`` between units of work, which raises ``StopRequested`` once the flag is
set. The task wrapper then saves what is consistent and exits 130. A second signal aborts at once.
"""

import logging
import signal
import threading
from contextlib import contextmanager

log = logging.getLogger("metarun")

_requested = threading.Event()


class StopRequested(KeyboardInterrupt):
    """Raised by ``check()`` after a SIGINT or SIGTERM: stop now, keep what is consistent."""


def requested() -> bool:
    return _requested.is_set()


def check() -> None:
    """Raise ``StopRequested`` if a stop was asked for; call it between units of work."""
    if _requested.is_set():
        raise StopRequested


def checked(value):
    """``value``, after a ``check()``: for the units of work inside an expression (a loop over tasks)."""
    check()
    return value


def _handle(signum, frame):
    if _requested.is_set():
        raise KeyboardInterrupt  # a second signal: abort at once (saves are atomic, nothing is torn)
    _requested.set()
    log.warning(f"{signal.Signals(signum).name}: stopping at the next safe point and saving a checkpoint "
                f"(Ctrl-C again to abort now)")


@contextmanager
def handle_signals():
    """Turn SIGINT/SIGTERM into stop requests for the duration of the block (main thread only)."""
    _requested.clear()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _requested.clear()
