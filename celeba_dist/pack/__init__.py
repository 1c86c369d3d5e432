"""Packing CelebA (official, torchvision layout, Hugging Face) into WebDataset shards: ``celeba-dist pack``
and ``verify``. Imports no torch.
"""
