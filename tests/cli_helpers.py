"""Running an entry point's `main(argv)` inside the test process, as `python <script>` would run it.

`run_main` is the code between the command line and the user (UserError / OSError -> `error: ...`, exit 2), so
calling it here checks the same one-line message and exit status as a subprocess, without paying Python,
torch and transformers start-up (~5 s on 2 cores) per case. A bug raises out of `run_main` and fails the test,
as a traceback would. Each entry point keeps at least one real subprocess test of its `__main__` path.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
from dataclasses import dataclass
from typing import Callable

import pytest

from library.errors import run_main


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run_in_process(main: Callable[[list[str]], int | None], argv: list) -> Ran:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # entry points set up console logging on the root logger
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exited:
            run_main(lambda: main([str(a) for a in argv]))
    finally:
        root.handlers[:], root.level = handlers, level
    code = exited.value.code
    return Ran(code if isinstance(code, int) else (0 if code is None else 1), out.getvalue(), err.getvalue())


def script_main(script: str) -> Callable[[list[str]], int | None]:
    """The `main` of a script given by its path in the repository, e.g. "networks/resize_lora.py"."""
    return importlib.import_module(script.removesuffix(".py").replace("/", ".")).main


def one_error(ran) -> str:
    """The single `error:` line of a run that stopped with exit status 2 (a Ran or a CompletedProcess)."""
    assert ran.returncode == 2 and "Traceback" not in ran.stderr, ran.stderr[-3000:]
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, ran.stderr[-3000:]
    return errors[0]
