from llmtree.cli import main

raise SystemExit(main())
