"""The committed completion scripts match what the command line generates now."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

COMPLETIONS = Path(__file__).resolve().parents[2] / "completions"


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_script_is_current(gcsstream_exe, shell):
    env = {**os.environ, "_GCSSTREAM_COMPLETE": f"source_{shell}"}
    generated = subprocess.run([gcsstream_exe], env=env, capture_output=True, check=True, text=True).stdout
    committed = (COMPLETIONS / f"gcsstream.{shell}").read_text()
    assert generated == committed, (
        f"completions/gcsstream.{shell} is stale: regenerate with "
        "`for s in bash zsh fish; do _GCSSTREAM_COMPLETE=source_$s gcsstream "
        "> completions/gcsstream.$s; done`"
    )


def test_bash_completes_subcommands_and_options(gcsstream_exe):
    script = COMPLETIONS / "gcsstream.bash"
    bin_dir = Path(gcsstream_exe).parent
    probe = (
        f'PATH="{bin_dir}:$PATH"; source "{script}"; '
        'COMP_WORDS=(gcsstream p); COMP_CWORD=1; _gcsstream_completion gcsstream; echo "${COMPREPLY[@]}"; '
        "COMP_WORDS=(gcsstream put --no-cl); COMP_CWORD=2; "
        '_gcsstream_completion gcsstream; echo "${COMPREPLY[@]}"'
    )
    out = subprocess.run(
        ["bash", "-c", probe], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0].split() == ["put"]
    assert out[1].split() == ["--no-clobber"]
