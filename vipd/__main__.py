"""Entry point for ``python -m vipd``: hands argv to the CLI."""

from vipd.cli import main

raise SystemExit(main())
