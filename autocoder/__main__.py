from autocoder.cli import main

raise SystemExit(main())
