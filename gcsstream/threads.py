"""The threads gcsstream starts besides the caller's: daemons that leave signals to the main thread.

Python runs signal handlers only in the main thread, but the kernel may deliver a signal sent to
the process to any thread that does not block it. A Ctrl-C taken by a helper thread sets Python's
flag without waking the main thread, so a main thread blocked in a socket read (up to the io
timeout) or a lock went on as if no signal had come. Threads started here block the signals a
program handles (they inherit the mask from ``start``), so the kernel gives those to the main
thread, whose blocking call returns at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

#: Asynchronous signals a program may handle; faults (SIGSEGV, SIGBUS, ...) stay with the thread
#: that caused them.
LEFT_TO_THE_MAIN_THREAD = frozenset(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGWINCH")
    if hasattr(signal, name)
)


class HelperThread(threading.Thread):
    """A daemon thread (it never holds up the process's exit) that receives no signal."""

    def __init__(self, target: Callable[..., object], *, name: str, args: tuple[object, ...] = ()) -> None:
        super().__init__(target=target, name=name, args=args, daemon=True)

    def start(self) -> None:
        if not hasattr(signal, "pthread_sigmask"):  # no POSIX signal masks: nothing to hand over
            super().start()
            return
        # Blocked around the start, the new thread inherits the mask with no window; a signal
        # that comes meanwhile waits, and is handled as soon as the caller's mask is back.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, LEFT_TO_THE_MAIN_THREAD)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
