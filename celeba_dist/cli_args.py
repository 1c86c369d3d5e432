"""What the command-line programs share: integer argument types, and how an error is reported."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` that accepts integers >= ``minimum`` and explains any other text."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)


# How gloo and NCCL say that a peer rank died: this rank's error is then only a consequence.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
             "Broken pipe")


def report_error(prog: str, exc: BaseException) -> int:
    """Log and print one error line for ``exc``; returns the exit status, 1.

    The DataLoader re-raises a worker's error with a copy of the worker's traceback in the
    message; its last line is the one that names the shard and sample, so only that is kept.
    """
    text = str(exc).strip()
    if "Original Traceback" in text:  # "Caught DataError in DataLoader worker process 1. ... module.DataError: msg"
        lines = text.splitlines()
        text = f"{lines[0].removeprefix('Caught ').rstrip('.')}: {lines[-1].partition(': ')[2]}"
    elif any(marker in text for marker in PEER_GONE):
        text = f"another process of this run ended (its own error, printed above or in its log, says why): {text}"
    logger = logging.getLogger("celeba_dist")
    if logger.handlers:  # the run's log file keeps it too; unconfigured, logging would print it a second time
        logger.error("%s: %s", type(exc).__name__, text)
    print(f"{prog}: error: {text}", file=sys.stderr)
    return 1
