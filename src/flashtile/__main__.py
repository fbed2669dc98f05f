from flashtile.cli import main

raise SystemExit(main())
