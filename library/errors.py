"""User-facing errors.

Anything the user can fix (a wrong path, a broken file, a bad config value) raises `UserError` with a
one-line message that names the file and the key. Entry points catch it through `run_main`, print the
message without a traceback and exit with status 2. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations

import difflib
import sys
from typing import Callable, Iterable, NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input; `str(err)` is the whole message, one line per problem."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Run an entry point's `main`, turning `UserError` into `error: …` on stderr and exit status 2."""
    try:
        code = main()
    except UserError as err:
        for line in str(err).splitlines() or ["unknown error"]:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except OSError as err:
        if err.filename is None:  # not about a path the user gave: a real bug, keep the traceback
            raise
        # a path the user gave cannot be read or written (permissions, full disk, not a folder): one line
        target = f"{err.filename} -> {err.filename2}" if err.filename2 else str(err.filename)
        print(f"error: {target}: {err.strerror or err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The known name a mistyped one most likely meant (for "did you mean ...?"), or None."""
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None
