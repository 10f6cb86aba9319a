"""`python -m roadkit ...`: the command line (see `roadkit.app.cli`)."""

import sys

from .app.cli import main

sys.exit(main())
