"""The ``gcsstream`` command's entry point (and ``python -m gcsstream``).

``gcsstream --version`` is answered here, before the command line (typer, and every option of
every command, which typer builds at each start) is loaded: scripts and package managers ask
for it often, and it needs none of that.
"""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        from gcsstream import __version__

        print(f"gcsstream {__version__}")
        return
    from gcsstream.cli import main as command_line

    command_line()


if __name__ == "__main__":
    main()
