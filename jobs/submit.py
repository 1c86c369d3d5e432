"""Same as ``celeba-dist submit``; see celeba_dist/launch/submit.py."""
from celeba_dist.launch.submit import main

raise SystemExit(main())
