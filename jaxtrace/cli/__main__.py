"""`python -m jaxtrace.cli`: the command line."""

import sys

from jaxtrace.cli import main

sys.exit(main())
