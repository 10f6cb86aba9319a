"""`python -m roadkit ...`: the command line (see `roadkit.cli`)."""

import sys

from .cli import main

sys.exit(main())
