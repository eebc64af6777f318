"""`python -m loom.cli ...`: the `loom` command (as `loom serve` is started by bench serve and the tests)."""

import sys

from loom.cli import main

sys.exit(main())
