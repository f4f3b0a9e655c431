"""``python -m zero_all`` = the ``zero-all`` command."""

from zero_all.cli import main

raise SystemExit(main())
