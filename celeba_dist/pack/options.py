"""The options of ``celeba-dist pack`` and the error that stops a pack."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_SAMPLES_PER_SHARD = 256  # full CelebA train -> 636 shards: enough for 8 nodes x 8 GPUs x 8 workers


class PackError(RuntimeError):
    """Packing cannot go on; the message says what to do."""


@dataclass(frozen=True)
class PackOptions:
    """Every option of ``celeba-dist pack`` (None: not given)."""

    samples_per_shard: int | None = DEFAULT_SAMPLES_PER_SHARD
    max_shard_bytes: int | None = None
    resize: tuple[int, int] | None = None
    quality: int = 95
    workers: int = 1
    limit: int | None = None
    skip_bad: bool = False
    split_ratios: tuple[float, float, float] | None = None
    stratify: tuple[str, ...] | None = None
    attributes: tuple[str, ...] | None = None
    seed: int = 0
    image_column: str | None = None
    id_column: str | None = None
    identity_column: str | None = None

    def content(self) -> dict[str, Any]:
        """The options that shape the shards' bytes (``workers`` and ``skip_bad`` do not)."""
        out = self.as_json()
        for key in ("workers", "skip_bad"):
            out.pop(key)
        return out

    def as_json(self) -> dict[str, Any]:
        """Every option as plain JSON values (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))
