from celeba_dist.cli import main

raise SystemExit(main())
