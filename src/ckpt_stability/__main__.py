from ckpt_stability.cli import main

raise SystemExit(main())
