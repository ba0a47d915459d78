"""The committed completion scripts match what the command line generates now, and the README's
install commands work as written in a fresh HOME, completing upload ids from the journal."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import hold_a_file_upload
from tests.gcs_test_server import GcsTestServer

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


# -- the README's install commands, run as written in an empty HOME ----------------------------

README = COMPLETIONS.parent / "README.md"


def readme_install_commands() -> dict[str, str]:
    """The fenced ```bash / ```zsh / ```fish blocks of the README's "Shell completion" section."""
    text = README.read_text()
    section = text.split("### Shell completion", 1)[1].split("\n#", 1)[0]
    return dict(re.findall(r"^```(bash|zsh|fish)\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL))


@pytest.fixture
def clean_home(tmp_path, gcsstream_exe, state_dir):
    """An environment with an empty HOME, gcsstream on PATH, and one unfinished upload journaled."""
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "HOME": str(home),
        "PATH": f"{Path(gcsstream_exe).parent}:/usr/local/bin:/usr/bin:/bin",
        "GCSSTREAM_STATE_DIR": str(state_dir),
        "TERM": "dumb",
        "LANG": "C.UTF-8",
    }
    with GcsTestServer(data_dir=tmp_path / "server", buckets=["complete-me"]) as server:
        src = tmp_path / "src.bin"
        src.write_bytes(os.urandom(3 * 256 * 1024 + 5))
        hold_a_file_upload(server, 256 * 1024)
        r = subprocess.run(
            ["gcsstream", "put", "--chunk-size", "256KiB", "--retry-deadline", "0.3", str(src),
             "gs://complete-me/o"], env={**env, "STORAGE_EMULATOR_HOST": server.url}, capture_output=True,
            timeout=120,
        )  # fmt: skip
    assert r.returncode == 75, r.stderr
    (upload,) = [p.stem for p in state_dir.glob("*.json")]
    return env, home, upload


def shell(argv: list[str], env: dict[str, str], home: Path) -> str:
    r = subprocess.run(
        argv, env=env, cwd=home, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert r.returncode == 0, (argv, r.stdout, r.stderr)
    return r.stdout


def test_readme_has_install_commands_for_each_shell():
    assert set(readme_install_commands()) == {"bash", "zsh", "fish"}


BASH_COMPLETES = (
    'COMP_WORDS=(gcsstream resume ""); COMP_CWORD=2; _gcsstream_completion gcsstream; '
    'echo "${COMPREPLY[@]}"; '
    'COMP_WORDS=(gcsstream ab); COMP_CWORD=1; _gcsstream_completion gcsstream; echo "${COMPREPLY[@]}"'
)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_readme_bash_install_works_without_bash_completion(clean_home):
    env, home, upload = clean_home
    shell(["bash", "-c", readme_install_commands()["bash"]], env, home)
    out = shell(["bash", "-i", "-c", BASH_COMPLETES], env, home).splitlines()
    assert out[-2:] == [upload, "abort"], out


BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")


@pytest.mark.skipif(not BASH_COMPLETION.exists(), reason="the bash-completion package is not installed")
def test_readme_bash_install_works_with_bash_completion(clean_home):
    env, home, upload = clean_home
    (home / ".bashrc").write_text(f". {BASH_COMPLETION}\n")  # as Debian's /etc/skel/.bashrc does
    shell(["bash", "-c", readme_install_commands()["bash"]], env, home)
    out = shell(["bash", "-i", "-c", BASH_COMPLETES], env, home).splitlines()
    assert out[-2:] == [upload, "abort"], out
    # bash-completion alone (no ~/.bashrc line) finds the file on demand.
    probe = f". {BASH_COMPLETION}; __load_completion gcsstream && {BASH_COMPLETES}"
    out = shell(["bash", "--norc", "-c", probe], env, home).splitlines()
    assert out[-2:] == [upload, "abort"], out


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_readme_zsh_install_works(clean_home):
    env, home, upload = clean_home
    shell(["zsh", "-c", readme_install_commands()["zsh"]], env, home)
    # An interactive zsh completes gcsstream with the script's function (compinit's table).
    probe = "print -r -- $_comps[gcsstream]; print -r -- ${+functions[_gcsstream_completion]}"
    out = shell(["zsh", "-i", "-c", probe], env, home).splitlines()
    assert out[-2:] == ["_gcsstream_completion", "1"], out
    # What that function evaluates for `gcsstream resume <TAB>`: the journal's id.
    asked = {**env, "_TYPER_COMPLETE_ARGS": "gcsstream resume ", "_GCSSTREAM_COMPLETE": "complete_zsh"}
    assert f'"{upload}":"gs\\\\://complete-me/o' in shell(["gcsstream"], asked, home)


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_readme_fish_install_works(clean_home):
    env, home, upload = clean_home
    shell(["fish", "-c", readme_install_commands()["fish"]], env, home)
    for command in ("resume", "status", "abort"):
        out = shell(["fish", "-c", f"complete -C 'gcsstream {command} '"], env, home).splitlines()
        assert [line.split("\t")[0] for line in out] == [upload], out
        assert "gs://complete-me/o" in out[0]
    out = shell(["fish", "-c", "complete -C 'gcsstream sess'"], env, home).splitlines()
    assert [line.split("\t")[0] for line in out] == ["sessions"], out
