"""The command line's stop signals: the first stops the run, those after it are let go until the
process exits (``timeout`` signals the command and then its process group; a second Ctrl-C), so
they cannot cut short the stop's cleanup or the line that says how to continue."""

from __future__ import annotations

import signal

import pytest

from gcsstream import cli


@pytest.fixture
def handlers(monkeypatch):
    monkeypatch.setattr(cli, "_stopping", False)
    saved = {signum: signal.getsignal(signum) for signum in cli.STOPPED_BY}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_the_first_stop_signal_stops_and_the_next_ones_are_let_go(handlers, signum):
    with pytest.raises(cli._Signalled) as stopped, cli._stop_signals():
        signal.raise_signal(signum)
    assert stopped.value.signum == signum
    assert signal.getsignal(signum) is cli._on_stop_signal  # still ours: not put back
    signal.raise_signal(signal.SIGINT)  # let go, whichever comes next
    signal.raise_signal(signal.SIGTERM)


def test_a_sigint_is_not_a_keyboard_interrupt_that_typer_would_swallow(handlers):
    # typer turns a KeyboardInterrupt leaving a command into a silent exit 130.
    with pytest.raises(cli._Signalled), cli._stop_signals():
        signal.raise_signal(signal.SIGINT)
    assert not issubclass(cli._Signalled, KeyboardInterrupt)


def test_without_a_signal_the_handlers_are_put_back(handlers):
    before = signal.getsignal(signal.SIGTERM)
    with cli._stop_signals():
        assert signal.getsignal(signal.SIGTERM) is cli._on_stop_signal
    assert signal.getsignal(signal.SIGTERM) is before
