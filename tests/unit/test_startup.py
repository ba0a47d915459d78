"""Start-up imports nothing heavy: ``--version``, ``--help`` and completion stay instant.

Each case runs the installed ``gcsstream`` command (the console script users run) in a fresh
process with Python's import profiler on (``PYTHONPROFILEIMPORTTIME``), which names on stderr
every module imported during the whole run, including those imported inside functions. No timing
is asserted: which modules load is what decides the time, and it does not vary with the load of
the machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import gcsstream

#: What only a command that talks to the service, or draws a progress bar, needs.
HEAVY = (
    "requests",
    "urllib3",
    "google.auth",
    "google.resumable_media",
    "google.cloud",
    "rich",
    "cryptography",
    "logging",  # only --debug and the journal's warnings log
)

COMPLETE_PUT = {"_GCSSTREAM_COMPLETE": "complete_bash", "COMP_WORDS": "gcsstream pu", "COMP_CWORD": "1"}

#: (arguments, extra environment, text the run must print: it did what was asked).
START_UPS = {
    "version": (["--version"], {}, f"gcsstream {gcsstream.__version__}"),
    "bare": ([], {}, "Usage: gcsstream"),
    "help": (["--help"], {}, "Usage: gcsstream"),
    "completion": ([], COMPLETE_PUT, "put"),
    **{
        f"{command} --help": ([command, "--help"], {}, f"Usage: gcsstream {command}")
        for command in ("put", "resume", "cat", "sessions", "status", "abort")
    },
}


def imported(argv: list[str], env: dict[str, str] | None = None) -> tuple[set[str], str]:
    """The modules a fresh process imported while running ``argv``, and what it printed."""
    run = subprocess.run(
        argv,
        env={**os.environ, **(env or {}), "PYTHONPROFILEIMPORTTIME": "1"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    modules, other = set(), []
    for line in run.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                modules.add(name)
        else:
            other.append(line)
    assert "gcsstream" in modules, run.stderr[-2000:]  # the profile was on
    return modules, run.stdout + "\n".join(other)


def heavy_in(modules: set[str], heavy: tuple[str, ...] = HEAVY) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in heavy))


def test_importing_the_command_line_imports_nothing_heavy():
    modules, _ = imported([sys.executable, "-c", "import gcsstream.cli"])
    assert "gcsstream.cli" in modules
    assert heavy_in(modules) == []


@pytest.mark.parametrize("case", list(START_UPS))
def test_start_up_imports_nothing_heavy(gcsstream_exe, case):
    args, env, expected = START_UPS[case]
    modules, output = imported([gcsstream_exe, *args], env)
    assert expected in output
    assert heavy_in(modules) == []


@pytest.mark.parametrize("case", ["version", "put --help", "completion"])
def test_start_up_imports_no_pydantic(gcsstream_exe, case):
    """typer 0.29 validates each option through pydantic, whose import costs more than the rest of
    start-up together: pyproject.toml keeps typer below it."""
    args, env, expected = START_UPS[case]
    modules, output = imported([gcsstream_exe, *args], env)
    assert expected in output
    assert heavy_in(modules, ("pydantic",)) == []


def test_the_version_is_answered_before_the_command_line_loads(gcsstream_exe):
    """``--version`` alone needs neither typer nor the command line's modules."""
    modules, output = imported([gcsstream_exe, "--version"])
    assert output.strip() == f"gcsstream {gcsstream.__version__}"
    assert heavy_in(modules, ("typer", "gcsstream.cli")) == []


#: Each command's help, and a completion of its options, built the way main() builds them.
SAME_OUTPUT = [
    *[
        ([command, "--help"], {})
        for command in ("put", "resume", "cat", "stat", "sessions", "status", "abort")
    ],
    ([], {"_GCSSTREAM_COMPLETE": "complete_bash", "COMP_WORDS": "gcsstream put --no-c", "COMP_CWORD": "2"}),
    (
        [],
        {
            "_GCSSTREAM_COMPLETE": "complete_bash",
            "COMP_WORDS": "gcsstream cat gs://b/o --r",
            "COMP_CWORD": "3",
        },
    ),
    ([], {"_GCSSTREAM_COMPLETE": "complete_bash", "COMP_WORDS": "gcsstream s", "COMP_CWORD": "1"}),
    (["--help"], {}),
    (["nope"], {}),
]


@pytest.mark.parametrize("args, env", SAME_OUTPUT, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_building_only_the_named_command_changes_no_output(args, env):
    """main() builds only the command named (typer builds every command's options otherwise): the
    help, completions and errors are the same as with every command built."""
    code = (
        "import sys\n"
        "from gcsstream import cli\n"
        "if sys.argv[1] == 'all':\n"
        "    cli._only_the_command_named = lambda args: None\n"
        "sys.argv = ['gcsstream', *sys.argv[2:]]\n"
        "cli.main()\n"
    )
    outputs = []
    for how in ("all", "named"):
        run = subprocess.run(
            [sys.executable, "-c", code, how, *args], env={**os.environ, **env, "COLUMNS": "100"},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        outputs.append((run.returncode, run.stdout, run.stderr.split("Z gcsstream: ", 1)[-1]))
    assert outputs[0] == outputs[1]
    assert outputs[0][1] or outputs[0][2]


def test_only_the_named_command_is_built_and_main_can_run_again(monkeypatch):
    from gcsstream import cli

    def built() -> list[str]:
        return [c.callback.__name__ for c in cli.app.registered_commands]

    monkeypatch.delenv("_GCSSTREAM_COMPLETE", raising=False)
    every = sorted(built())
    cli._only_the_command_named(["cat", "gs://b/o"])
    assert built() == ["cat"]
    cli._only_the_command_named(["put", "--help"])  # a second main() in one process
    assert built() == ["put"]
    for args in ([], ["--help"], ["nope"], ["--version"]):
        cli._only_the_command_named(args)
        assert sorted(built()) == every
    monkeypatch.setenv("_GCSSTREAM_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", "gcsstream res")
    monkeypatch.setenv("COMP_CWORD", "1")
    cli._only_the_command_named([])
    assert sorted(built()) == every
    monkeypatch.setenv("COMP_WORDS", "gcsstream resume ")
    monkeypatch.setenv("COMP_CWORD", "2")
    cli._only_the_command_named([])
    assert built() == ["resume"]
    monkeypatch.delenv("_GCSSTREAM_COMPLETE")
    cli._only_the_command_named([])
    assert sorted(built()) == every


def test_a_command_still_loads_what_it_needs(gcsstream_exe, tmp_path):
    """The lazy imports happen: a usage error found after the transport is imported still maps to
    exit 2, and the heavy modules are then loaded (the profile would see them)."""
    modules, output = imported(
        [gcsstream_exe, "cat", "gs://bkt/obj", "--range", "not-a-range"],
    )
    assert "gcsstream: error:" in output
    assert "gcsstream.download" in modules and "gcsstream.transport" in modules


def test_the_package_exports_load_on_first_use():
    code = (
        "import sys, gcsstream\n"
        "assert 'gcsstream.transport' not in sys.modules and 'requests' not in sys.modules\n"
        "from gcsstream import upload, open_upload, Uploader, Transport, UploadOptions\n"
        "import gcsstream.api, gcsstream.engine, gcsstream.transport\n"
        "assert upload is gcsstream.api.upload and Transport is gcsstream.transport.Transport\n"
        "assert Uploader is gcsstream.engine.Uploader and gcsstream.aio.upload\n"
        "missing = [n for n in gcsstream.__all__ if not hasattr(gcsstream, n)]\n"
        "assert not missing, missing\n"
        "assert set(gcsstream.__all__) <= set(dir(gcsstream))\n"
        "ns = {}\n"
        "exec('from gcsstream import *', ns)\n"
        "assert set(gcsstream.__all__) <= set(ns)\n"
        "try:\n"
        "    gcsstream.no_such_name\n"
        "except AttributeError as exc:\n"
        "    assert 'no_such_name' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"
