"""Reading torch files without running them: ``torch.load(weights_only=True)``, plus numpy's array
reconstruction (data, not code), which checkpoints of earlier versions need for their numpy RNG state.
A file that needs anything else is refused with :class:`UnsafeFileError`; its code never runs."""
from __future__ import annotations

import os
import pickle
import re
from typing import Any

import numpy as np
import torch

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

ALLOWED_NUMPY = [np.ndarray, np.dtype, np.dtype(np.uint32).__class__, _reconstruct]


class UnsafeFileError(RuntimeError):
    """A torch file that holds more than tensors and plain containers: refused, never executed."""


def load_weights_only(path: str | os.PathLike[str], *, what: str = "file", mmap: bool = False) -> Any:
    """``torch.load`` of ``path`` on the CPU that never runs code from it; ``mmap``: the tensors stay in the
    file, mapped, and only the pages read are fetched (a check that looks at a few fields of a large file)."""
    try:
        with torch.serialization.safe_globals(ALLOWED_NUMPY):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        wanted = re.search(r"GLOBAL (\S+)", str(exc))
        raise UnsafeFileError(
            f"{what} {path} refused: it holds more than tensors and plain containers"
            f"{f' (it asks for {wanted.group(1)})' if wanted else ''}, and unpickling it could run code from the "
            "file, so it was not loaded") from None
