"""`python -m adaprune ...` runs the `adaprune` command."""

import sys

from .cli import main

sys.exit(main())
