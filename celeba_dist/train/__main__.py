"""``python -m celeba_dist.train`` (what ``accelerate launch`` and ``torchrun`` run): ``celeba-dist train``."""
from celeba_dist.train.main import cli_main

raise SystemExit(cli_main())
