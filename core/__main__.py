from sdjobs.cli import main

raise SystemExit(main())
