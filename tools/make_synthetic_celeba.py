"""Write a synthetic CelebA: same as ``celeba-dist synth OUT_DIR --num-images N``."""
from celeba_dist.synthetic import main

if __name__ == "__main__":  # worker processes are spawned and re-import this file
    raise SystemExit(main())
