"""`python -m library.train.launch ARGS...` is `accelerate launch ARGS...` that ends cleanly when it is stopped.

A SIGTERM/SIGINT to `accelerate launch` (docker stop, a cluster pre-empting the job) reaches torchrun's agent,
which forwards it to the training processes (they finish the step, save a state and exit 128 + signal)
and then re-raises `SignalException` as a traceback with exit status 1. This wrapper prints one line and
exits 128 + signal instead, like a single-process run.
"""

from __future__ import annotations

import sys

from accelerate.commands.launch import launch_command, launch_command_parser
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from library.errors import EXIT_USER_ERROR


def main(argv: list[str] | None = None) -> int:
    args = launch_command_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        launch_command(args)
    except SignalException as err:
        print(f"{err.sigval.name}: the training processes were stopped after saving a state (its --resume path "
              "is in the log above)", file=sys.stderr)
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        if err.get_first_failure()[1].exitcode != EXIT_USER_ERROR:
            raise  # a crash: torchrun's report of it is the useful part
        return EXIT_USER_ERROR  # the processes printed the `error:` line
    return 0


if __name__ == "__main__":
    sys.exit(main())
