"""Entry point for ``python -m miniattn``."""

from .cli import main

raise SystemExit(main())
