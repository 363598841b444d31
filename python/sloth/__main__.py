"""`python -m sloth ...` is the `sloth` command."""

import sys

from .cli import main

sys.exit(main())
