"""Pack a CelebA source into WebDataset shards: the same as ``celeba-dist pack``."""
from celeba_dist.pack.cli import main

raise SystemExit(main())
