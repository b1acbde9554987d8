"""``python -m polyak``: the command line."""

from .cli import main

raise SystemExit(main())
