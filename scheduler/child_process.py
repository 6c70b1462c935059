"""What the engine process and the tensor-parallel workers share as children of the front end.

Only the front end decides when they stop (a shutdown message, a bounded wait, then SIGKILL): a stop signal sent to
the whole process group or cgroup (systemd, supervisord, docker, Ctrl-C) must reach the front end alone, or the
drain has nothing left to drain. The front end starts each child with the stop signals blocked, so that a signal
that arrives while the child's interpreter imports torch stays pending; the child then ignores them, which drops it.
"""
import contextlib
import signal
import threading
from collections.abc import Iterator
from multiprocessing import resource_tracker

from tqdm import tqdm

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Blocks the stop signals on this thread while it starts a child (the child inherits the mask)."""
    resource_tracker.ensure_running()  # first: starting the tracker unblocks the stop signals on this thread
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def become_engine_child() -> None:
    """Called first in a child: ignore the stop signals (workers it starts inherit that), then unblock them.

    tqdm's progress bars get a thread lock instead of a multiprocessing one: the children end with ``os._exit``,
    which never unregisters a semaphore, and the resource tracker would report it as leaked."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    tqdm.set_lock(threading.RLock())
