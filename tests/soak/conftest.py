"""Counts the soak's outcomes and prints them at the end of the run."""

from __future__ import annotations

import pytest

_OUTCOMES: dict = {"whole": 0, "resumed": 0, "faults": 0, "kinds": {}}


@pytest.fixture(scope="session")
def soak_outcomes() -> dict[str, int]:
    return _OUTCOMES


def pytest_terminal_summary(terminalreporter) -> None:
    if _OUTCOMES["whole"] or _OUTCOMES["resumed"]:
        terminalreporter.write_line(
            f"soak: {_OUTCOMES['whole']} whole objects at once, {_OUTCOMES['resumed']} whole after "
            f"exit 75 and gcsstream resume, {_OUTCOMES['faults']} faults injected ("
            + ", ".join(f"{kind} {n}" for kind, n in sorted(_OUTCOMES["kinds"].items()))
            + ")"
        )
