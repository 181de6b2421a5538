from qwen_ft.cli import main

raise SystemExit(main())
