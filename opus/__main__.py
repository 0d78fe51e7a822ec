"""``opus`` and ``python -m opus``: ``opus --version`` answered before click or the library is
imported (SPEC §12: the interpreter's own start is the floor); anything else is the click app.

The console script ``opus`` calls ``main`` here, not ``opus.cli.main``, for that reason.
"""

import os
import sys


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        from . import __version__

        try:  # what click's version_option on ``opus.cli.main`` prints
            sys.stdout.write(f"opus, version {__version__}\n")
            sys.stdout.flush()
        except BrokenPipeError:  # the reader went away: as click, no traceback and status 1
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        return
    from .cli import main as cli

    cli()


if __name__ == "__main__":
    main()
