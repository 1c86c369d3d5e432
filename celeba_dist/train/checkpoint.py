"""Checkpoints that survive kills: one self-contained file each, written atomically.

A checkpoint holds the model, optimizer, scheduler and grad-scaler states, the RNG states of
every rank, the training position (epoch, global step, batches done in the epoch), the best
validation result so far and the resolved config. Rank 0 writes it to a temporary name, flushes
it to disk and renames it: a kill at any moment leaves either the old set of checkpoints or the
new one, never half a file under a checkpoint's name. ``best.pt`` is a hard link to the best
step's file (or a copy where links are not supported).

Checkpoints hold only tensors and plain containers (the numpy RNG state is stored as a tensor), and
they are read with ``torch.load(weights_only=True)``: a file that would need anything else, such as a
pickle crafted to run code, is refused with :class:`UnsafeCheckpointError` and never executed.
Checkpoints of earlier versions, whose numpy RNG state was a numpy array, still load: numpy's array
reconstruction (data, not code) is the one thing allowed beyond torch's defaults.
"""
from __future__ import annotations

import logging
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from celeba_dist.diskio import atomic_write, link_or_copy
from celeba_dist.safeload import UnsafeFileError, load_weights_only

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step-(\d{9})\.pt$")
BEST = "best.pt"


def step_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step-{step:09d}.pt"


def step_of(path: Path | None) -> int:
    """The optimizer step in a step checkpoint's name; 0 for None (no checkpoint yet)."""
    return int(STEP_RE.match(path.name).group(1)) if path is not None else 0


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Step checkpoints, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


class UnsafeCheckpointError(UnsafeFileError):
    """A checkpoint that holds more than tensors and plain containers: refused, never executed."""


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to ``path`` all or nothing (:func:`celeba_dist.diskio.atomic_write`); a full disk
    raises :class:`celeba_dist.diskio.DiskFullError` naming the file."""
    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


def link_best(ckpt_dir: Path, source: Path) -> None:
    """Point best.pt at ``source`` atomically (hard link, or a copy where links fail)."""
    link_or_copy(source, ckpt_dir / BEST)


def newest_intact(ckpt_dir: Path) -> Path | None:
    """The newest step checkpoint whose zip directory is complete (a cheap check: nothing is loaded)."""
    return next((p for p in list_checkpoints(ckpt_dir) if zipfile.is_zipfile(p)), None)


PARTIAL_SAVE = re.compile(r"\.(step-\d+\.pt|best\.pt)\.\d+\.tmp")  # diskio.temp_name of a checkpoint


def remove_partial_saves(ckpt_dir: Path) -> None:
    """Delete what a save killed half-way left under its temporary name (:func:`celeba_dist.diskio.temp_name`).
    Call it only with the run folder locked: then no live writer owns them."""
    for tmp in sorted(ckpt_dir.iterdir()) if ckpt_dir.is_dir() else []:
        if PARTIAL_SAVE.fullmatch(tmp.name):
            log.info("removing %s, left by a save that was killed", tmp)
            tmp.unlink(missing_ok=True)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints (best.pt is a separate link)."""
    for old in list_checkpoints(ckpt_dir)[max(1, keep_last):]:
        old.unlink(missing_ok=True)
        log.debug("removed old checkpoint %s", old)


def load_checkpoint(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint file on the CPU with ``weights_only=True`` (``mmap``: tensors mapped from the file,
    read only where used); raises ``FileNotFoundError`` when ``path`` is missing or a folder (a typo, not
    damage: "unreadable" would send the user hunting for corruption), :class:`UnsafeCheckpointError` for a
    file that needs more, and ``RuntimeError`` naming the file when it is unreadable."""
    _check_is_file(path)
    try:
        ckpt = load_weights_only(path, what="checkpoint", mmap=mmap)
    except UnsafeFileError as exc:
        raise UnsafeCheckpointError(f"{exc}; celeba-dist never writes such files: use a checkpoint written by "
                                    "celeba-dist, or delete this one") from None
    except Exception as exc:
        raise RuntimeError(f"checkpoint {path} is unreadable (truncated or corrupt?): {exc}") from exc
    missing = {"model", "state", "config"} - set(ckpt) if isinstance(ckpt, dict) else {"model", "state", "config"}
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks {sorted(missing)}")
    return ckpt


def _check_is_file(path: Path) -> None:
    if Path(path).is_dir():
        raise FileNotFoundError(f"{path} is a folder, not a checkpoint file")
    if not Path(path).exists():
        raise FileNotFoundError(f"no checkpoint file {path}")


def load_newest_valid(ckpt_dir: Path, *, mmap: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """The newest step checkpoint that loads; broken ones are reported and skipped, an unsafe one
    (:class:`UnsafeCheckpointError`) ends the search: someone put it there."""
    for path in list_checkpoints(ckpt_dir):
        try:
            return path, load_checkpoint(path, mmap=mmap)
        except UnsafeCheckpointError:
            raise
        except (RuntimeError, FileNotFoundError) as exc:  # damaged, or gone since it was listed
            log.error("%s; falling back to the previous checkpoint", exc)
    return None
