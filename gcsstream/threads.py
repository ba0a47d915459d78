"""The threads gcsstream starts besides the caller's, and who receives the process's signals.

Python runs signal handlers only in the main thread, but the kernel may deliver a signal sent to
the process to any thread that does not block it. A Ctrl-C taken by a helper thread sets Python's
flag without waking the main thread, so a main thread blocked in a socket read (up to the io
timeout) or a lock went on as if no signal had come. The command line owns its process, so it
calls ``leave_signals_to_the_main_thread``: from then on the threads started here (and rich's
refresh thread) block the signals a program handles, and the kernel gives those to the main
thread, whose blocking call returns at once.

A library leaves the masks alone: its caller owns the process's signals, and gcsstream's threads
run the caller's code (iterables, progress callbacks, credential programs), whose children
inherit the mask of the thread that starts them and must be stoppable.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

#: Asynchronous signals a program may handle; faults (SIGSEGV, SIGBUS, ...) stay with the thread
#: that caused them.
LEFT_TO_THE_MAIN_THREAD = frozenset(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGWINCH")
    if hasattr(signal, name)
)

_leave_to_main = False


def leave_signals_to_the_main_thread() -> None:
    """Threads started from now on block ``LEFT_TO_THE_MAIN_THREAD`` (the command line's choice)."""
    global _leave_to_main
    _leave_to_main = hasattr(signal, "pthread_sigmask")  # none on Windows: nothing to hand over


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Threads started inside inherit a mask blocking the signals left to the main thread (if the
    process chose so); a signal that comes meanwhile waits, and is handled once this ends."""
    if not _leave_to_main:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, LEFT_TO_THE_MAIN_THREAD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class HelperThread(threading.Thread):
    """A daemon thread (it never holds up the process's exit), started under ``signals_held``.

    ``start`` may raise (a Ctrl-C held during the start) after the thread has started: callers
    that clean up after a failed start look at ``ident``.
    """

    def __init__(self, target: Callable[..., object], *, name: str, args: tuple[object, ...] = ()) -> None:
        super().__init__(target=target, name=name, args=args, daemon=True)

    def start(self) -> None:
        with signals_held():
            super().start()
