"""The layout of one WebDataset sample in the shards: what the packer writes and verify expects.

A sample is keyed by the image id and holds ``jpg`` (an RGB JPEG), ``attr.json`` (the 0/1 labels in
the manifest's attribute order) and one member per extra annotation the source has.
"""
from __future__ import annotations

import json
from typing import Any

from celeba_dist.pack.sources import SourceData

EXTRA_MEMBERS = {"identity": "identity.txt", "bbox": "bbox.json", "landmarks": "landmarks.json"}


def sample_members(extras: list[str]) -> set[str]:
    """The member suffixes of every sample of shards that carry ``extras``."""
    return {"jpg", "attr.json"} | {EXTRA_MEMBERS[e] for e in extras}


def make_sample(data: SourceData, columns: list[int], row: int, jpg: bytes) -> dict[str, Any]:
    """The sample of source row ``row``: its ``jpg``, the labels of ``columns`` and the extras present."""
    labels = data.labels[row, columns].tolist()
    sample: dict[str, Any] = {"__key__": data.ids[row], "jpg": jpg,
                              "attr.json": json.dumps(labels, separators=(",", ":")).encode()}
    for name, extra in data.extras.items():
        values = extra.values[row].tolist()
        if extra.fields is None:  # identity: one integer
            sample[EXTRA_MEMBERS[name]] = str(values).encode()
        else:
            sample[EXTRA_MEMBERS[name]] = json.dumps(dict(zip(extra.fields, values)), separators=(",", ":")).encode()
    return sample
