from cpal.cli import main

raise SystemExit(main())
