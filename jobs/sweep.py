"""Same as ``celeba-dist sweep``; see celeba_dist/launch/sweep.py."""
from celeba_dist.launch.sweep import main

raise SystemExit(main())
