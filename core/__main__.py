"""``python -m core`` is the ``pastiche`` command (handy without the console script)."""

from core.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
