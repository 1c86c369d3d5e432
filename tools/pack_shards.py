"""Pack a CelebA source into WebDataset shards: the same as ``celeba-dist pack``."""
from celeba_dist.packer import main

raise SystemExit(main())
