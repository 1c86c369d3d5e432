"""celeba-dist: distributed CelebA attribute classification on WebDataset shards.

``celeba_dist.load(PATH)`` opens an export folder, a run folder or a checkpoint as
(classifier, preprocess); see :mod:`celeba_dist.export.loading`.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load":  # lazily: importing the package (``celeba-dist pack``) must not import torch
        from celeba_dist.export.loading import load

        return load
    raise AttributeError(f"module 'celeba_dist' has no attribute {name!r}")
