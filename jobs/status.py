"""Same as ``celeba-dist jobs``; see celeba_dist/launch/status.py."""
from celeba_dist.launch.status import main

raise SystemExit(main())
