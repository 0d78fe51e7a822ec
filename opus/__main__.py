"""``opus`` and ``python -m opus``: ``opus --version`` answered before click or the library is
imported (SPEC §12: the interpreter's own start is the floor); anything else is the click app.

The console script ``opus`` calls ``main`` here, not ``opus.cli.main``, for that reason.
"""

import sys


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        from . import __version__

        # what click's version_option on ``opus.cli.main`` prints
        sys.stdout.write(f"opus, version {__version__}\n")
        return
    from .cli import main as cli

    cli()


if __name__ == "__main__":
    main()
