from checkstream.cli.main import main

raise SystemExit(main())
