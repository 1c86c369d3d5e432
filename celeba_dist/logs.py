"""Logging: INFO to stdout on the main process only, everything to a per-rank file in the run."""
from __future__ import annotations

import collections
import logging
import sys
from pathlib import Path

from celeba_dist.diskio import is_disk_full

FORMAT = "%(asctime)s %(levelname)s [rank %(rank)s] %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


class _Backlog(logging.Handler):
    """Records kept until the rank's log file may be opened (see :func:`attach_log_file`)."""

    def __init__(self, capacity: int = 10_000):
        super().__init__(logging.DEBUG)
        self.records: collections.deque[logging.LogRecord] = collections.deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _RankFile(logging.FileHandler):
    """The rank's log file; a full disk turns it off with one line on stderr instead of a traceback
    per record (the run then reports the full disk itself, where a checkpoint or a metric is written)."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if not is_disk_full(exc):
            return super().handleError(record)
        print(f"celeba-dist: no space left for the log file {self.baseFilename}: "
              "its records go to the console only from here", file=sys.stderr)
        logging.getLogger("celeba_dist").removeHandler(self)


def setup_logging(*, rank: int = 0, is_main: bool = True, log_dir: Path | None = None, level: int = logging.INFO,
                  pending_file: bool = False) -> None:
    """Configure the ``celeba_dist`` logger; safe to call again (handlers are replaced).

    ``pending_file``: no file yet (the run folder may not be written before its lock is held);
    the records are kept and written first into the file :func:`attach_log_file` opens.
    """
    logger = logging.getLogger("celeba_dist")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    rank_filter = _RankFilter(rank)
    if is_main:
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(level)
        console.addFilter(rank_filter)
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(console)
    else:  # other ranks still report errors on stderr
        errors = logging.StreamHandler(sys.stderr)
        errors.setLevel(logging.ERROR)
        errors.addFilter(rank_filter)
        errors.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(errors)
    if log_dir is not None:
        attach_log_file(log_dir, rank=rank)
    elif pending_file:
        logger.addHandler(_Backlog())


def attach_log_file(log_dir: Path, *, rank: int) -> None:
    """Log everything to ``log_dir/rank<rank>.log``, starting with what was kept since :func:`setup_logging`."""
    logger = logging.getLogger("celeba_dist")
    log_dir.mkdir(parents=True, exist_ok=True)
    file_handler = _RankFile(log_dir / f"rank{rank}.log")
    file_handler.setLevel(logging.DEBUG)
    file_handler.addFilter(_RankFilter(rank))
    file_handler.setFormatter(logging.Formatter(FORMAT))
    for backlog in [h for h in logger.handlers if isinstance(h, _Backlog)]:
        logger.removeHandler(backlog)
        for record in backlog.records:
            file_handler.handle(record)
    logger.addHandler(file_handler)
