"""`python -m plainsd ...` (as torchrun -m plainsd starts it) is the `plainsd` command."""

import sys

from plainsd.cli import main

sys.exit(main())
