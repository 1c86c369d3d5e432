"""celeba-dist: distributed CelebA attribute classification on WebDataset shards."""

__version__ = "0.1.0"
