"""``python -m engine``: see :mod:`engine.cli`."""
import atexit
import os
import sys


def _end(status: list[int]) -> None:
    """The last exit handler: every other one has run (Ray's shutdown, logging's flush), and every
    command has closed its files; what is left is the interpreter's teardown of torch's modules,
    up to a second on a loaded machine with nothing to save. Skip it."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status[0])


if __name__ == "__main__":
    status = [1]  # an uncaught exception exits with 1, as Python's own exit would
    atexit.register(_end, status)  # registered first, so it runs last
    from engine.cli import main

    status[0] = main()
    sys.exit(status[0])
