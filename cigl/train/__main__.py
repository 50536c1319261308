from cigl.train.cli import main

raise SystemExit(main())
