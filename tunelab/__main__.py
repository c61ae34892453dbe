"""`python -m tunelab` (and `accelerate launch -m tunelab`) runs the command line."""

import sys

from tunelab.cli import main

sys.exit(main())
