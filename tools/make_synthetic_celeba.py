"""Write a synthetic CelebA: same as ``celeba-dist synth OUT_DIR --num-images N``."""
from celeba_dist.synthetic import main

raise SystemExit(main())
