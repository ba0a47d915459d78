"""Counts the soak's outcomes and prints them at the end of the run."""

from __future__ import annotations

import pytest

_OUTCOMES = {"whole": 0, "resumable": 0, "faults": 0}


@pytest.fixture(scope="session")
def soak_outcomes() -> dict[str, int]:
    return _OUTCOMES


def pytest_terminal_summary(terminalreporter) -> None:
    if _OUTCOMES["whole"] or _OUTCOMES["resumable"]:
        terminalreporter.write_line(
            f"soak: {_OUTCOMES['whole']} whole objects, {_OUTCOMES['resumable']} resumable failures "
            f"(exit 75, session open), {_OUTCOMES['faults']} faults injected"
        )
