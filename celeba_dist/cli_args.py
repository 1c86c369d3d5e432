"""What the command-line programs share: argument types (integers, files to write), and how an error is reported."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
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


def out_file(text: str) -> Path:
    """An argparse ``type`` for a file to write: refused at once when it names a folder or lies under a
    file, rather than after the work, when the rename or ``mkdir`` of its folder would fail."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give the file to write")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # the folder that atomic_write's mkdir starts in
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {path}: {parent} is not writable")
    return path


# How gloo and NCCL say that a peer rank died: this rank's error is then only a consequence.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
             "Broken pipe")
# How PyTorch says a loader worker died without an error of its own (its SIGCHLD handler, or its poll).
WORKER_KILLED = ("killed by signal: Killed.", "exited unexpectedly")
# How gloo and NCCL say that a collective waited past the run's timeout: a peer hangs (or died silently).
TIMED_OUT = ("Timed out waiting", "collective operation timeout")


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
    elif text.startswith("DataLoader worker") and text.endswith(WORKER_KILLED):  # which one PyTorch says is a race
        text = (f"{text.rstrip('.')}: killed without a word, most often by the kernel's out-of-memory killer "
                "(`dmesg` tells); fewer data.num_workers or a smaller data.shuffle_buffer take less memory")
    elif text.startswith("DataLoader timed out after"):
        text = (f"{text.rstrip('.')} (data.loader_timeout_s): a loader worker delivered nothing for that long; "
                "it hangs on a stuck filesystem, or deadlocked as it started")
    elif any(marker in text for marker in TIMED_OUT):
        text = ("a collective waited longer than train.collective_timeout_min: another process of this run "
                f"hangs or died without a word (raise the timeout if a step really takes that long): {text}")
    logger = logging.getLogger("celeba_dist")
    if logger.handlers:  # the run's log file keeps it too; unconfigured, logging would print it a second time
        logger.error("%s: %s", type(exc).__name__, text)
    print(f"{prog}: error: {text}", file=sys.stderr)
    return 1
