"""``python -m ds_monitor`` runs the ``ds-monitor`` command."""

import sys

from ds_monitor.cli import main

sys.exit(main())
