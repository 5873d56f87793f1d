"""`python -m emoq.cli ...`: the same as the `emoq` command (what `accelerate launch -m` runs)."""

import sys

from .parser import main

sys.exit(main())
