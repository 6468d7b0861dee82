"""``python -m core.helper`` starts the helper service (the same as ``pastiche helper``)."""

from core.helper.server import main

if __name__ == "__main__":
    raise SystemExit(main())
