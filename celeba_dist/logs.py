"""Logging: INFO to stdout on the main process only, everything to a per-rank file in the run."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s [rank %(rank)s] %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(*, rank: int = 0, is_main: bool = True, log_dir: Path | None = None, level: int = logging.INFO) -> None:
    """Configure the ``celeba_dist`` logger; safe to call again (handlers are replaced)."""
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
        log_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_dir / f"rank{rank}.log")
        file_handler.setLevel(logging.DEBUG)
        file_handler.addFilter(rank_filter)
        file_handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(file_handler)
