"""``python -m kvkeep``: the command line, as the ``kvkeep`` script runs it."""

import sys

from .cli.main import main

sys.exit(main())
