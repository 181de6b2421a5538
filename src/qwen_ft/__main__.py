from qwen_ft.cli import run

raise SystemExit(run())
