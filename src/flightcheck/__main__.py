"""``python -m flightcheck analyze LOGDIR``: the same as the ``flightcheck`` command."""

import sys

from flightcheck.cli import main

sys.exit(main())
