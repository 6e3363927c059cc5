"""`python -m adaprune ...` runs the `adaprune` command."""

import sys

from .tools.cli import main

sys.exit(main())
