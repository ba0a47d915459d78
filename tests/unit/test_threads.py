"""Which thread takes the process's signals: with the command line's choice made, every thread
gcsstream starts (and rich's refresh thread) blocks them; an interrupted start leaves no thread
without an owner."""

from __future__ import annotations

import io
import signal
import threading

import pytest

from gcsstream import journal as journal_module
from gcsstream import parallel, progress, threads

pytestmark = pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")


@pytest.fixture
def left_to_main(monkeypatch):
    monkeypatch.setattr(threads, "_leave_to_main", True)


def _mask_of(start) -> set[int]:
    """The signal mask of a thread that ``start(report)`` starts, as it reports it."""
    seen: list[set[int]] = []
    reported = threading.Event()

    def report() -> None:
        seen.append(set(signal.pthread_sigmask(signal.SIG_BLOCK, set())))
        reported.set()

    start(report)
    assert reported.wait(10)
    return seen[0]


def test_a_helper_thread_blocks_the_signals_once_the_command_line_chose_so(left_to_main):
    mask = _mask_of(lambda report: threads.HelperThread(report, name="probe").start())
    assert mask >= threads.LEFT_TO_THE_MAIN_THREAD
    assert not threads.LEFT_TO_THE_MAIN_THREAD & set(signal.pthread_sigmask(signal.SIG_BLOCK, set()))


def test_a_helper_thread_keeps_the_callers_mask_in_a_library():
    assert not threads._leave_to_main
    mask = _mask_of(lambda report: threads.HelperThread(report, name="probe").start())
    assert signal.SIGINT not in mask


def test_the_live_bar_refresh_thread_blocks_the_signals(left_to_main):
    # Found in review: rich's _RefreshThread, the terminal's default display, could take Ctrl-C.
    before = set(threading.enumerate())
    state = progress.ProgressState("x", 10)
    with progress.display(state, mode=True, interval=1.0, quiet=False, stream=io.StringIO()):
        (refresh,) = [t for t in threading.enumerate() if t not in before]
        with open(f"/proc/self/task/{refresh.native_id}/status") as status:
            blocked = int(next(line for line in status if line.startswith("SigBlk:")).split()[1], 16)
    assert all(blocked >> (s - 1) & 1 for s in threads.LEFT_TO_THE_MAIN_THREAD)


def _interrupted_once_started(monkeypatch) -> None:
    """Thread.start that raises KeyboardInterrupt after the thread started, as a Ctrl-C held
    during HelperThread.start is raised when the mask is put back."""
    real = threading.Thread.start

    def start(self) -> None:
        real(self)
        monkeypatch.setattr(threading.Thread, "start", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", start)


def test_a_journal_write_interrupted_once_its_thread_started_is_served_by_that_thread(monkeypatch):
    # Found in review: the started thread had no owner; a second one was started beside it.
    writes: list[object] = []
    writer = journal_module._BackgroundWriter(writes.append)
    _interrupted_once_started(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        writer.submit("first")
    first = writer._thread
    assert first is not None and first.ident is not None
    writer.wait()
    writer.submit("second")
    writer.wait()
    assert writes == ["first", "second"] and writer._thread is first


def test_workers_interrupted_while_starting_end(monkeypatch):
    before = set(threading.enumerate())
    _interrupted_once_started(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        parallel._Workers(3, connect=lambda: None)  # type: ignore[arg-type, return-value]
    started = [t for t in threading.enumerate() if t not in before]
    assert [t.name for t in started] == ["gcsstream-part-0"]
    for thread in started:
        thread.join(10)
    assert not any(t.is_alive() for t in started)
