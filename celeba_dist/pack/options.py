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
    resplit: tuple[float, float, float] | None = None  # ignore the source's partition, generate one
    stratify: tuple[str, ...] | None = None
    attributes: tuple[str, ...] | None = None
    seed: int = 0
    image_column: str | None = None
    id_column: str | None = None
    identity_column: str | None = None

    def __post_init__(self) -> None:
        if self.resplit is not None and self.split_ratios is not None and self.resplit != self.split_ratios:
            raise PackError(f"--resplit {_ratios_text(self.resplit)} and --split-ratios "
                            f"{_ratios_text(self.split_ratios)} conflict: --resplit sets the split ratios itself, "
                            "pass only one of them")

    def content(self) -> dict[str, Any]:
        """The options that shape the shards' bytes (``workers`` and ``skip_bad`` do not).

        ``resplit`` only when given, so that a pack without it keeps the plan fingerprint it had
        before the option existed (and an interrupted one still resumes).
        """
        out = self.as_json()
        for key in ("workers", "skip_bad") + (("resplit",) if self.resplit is None else ()):
            out.pop(key)
        return out

    def as_json(self) -> dict[str, Any]:
        """Every option as plain JSON values (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))


def _ratios_text(ratios: tuple[float, float, float]) -> str:
    return ",".join(f"{r:g}" for r in ratios)
